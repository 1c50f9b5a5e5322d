"""Aligned neighbours: each retrieved chunk starts where it lines up with its query."""

from __future__ import annotations

import numpy as np

from retrieval import core, neighbours

M = 8


def _stream(*docs: list[int]) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.concatenate([np.asarray(d, np.int32) for d in docs])
  token_doc = np.repeat(np.arange(len(docs)), [len(d) for d in docs]).astype(np.int32)
  return tokens, token_doc


def test_align_offsets_finds_the_shift_of_a_copied_passage():
  """Document 0 holds the query's passage 3 tokens into chunk 1 (another edition): the
  window shifts by +3 and its continuation is the passage's; a chunk matching nowhere stays."""
  passage = list(range(100, 100 + 2 * M))  # the query chunk, then its continuation
  doc0 = [7] * (M + 3) + passage + [8] * 5
  doc1 = [9] * (3 * M)
  tokens, token_doc = _stream(doc0, doc1)
  query_QxM = np.asarray([passage[:M], passage[:M]], np.int32)
  doc1_chunk = len(doc0) // M + 1
  ids_QxK = np.asarray([[1, doc1_chunk], [1, -1]])
  shifts = core.align_offsets(tokens, token_doc, np.where(ids_QxK >= 0, ids_QxK, 0) * M,
                              query_QxM)
  assert shifts.tolist() == [[3, 0], [3, 0]]  # (the -1 row scored chunk 0: no match)
  win_QxKxR = core.chunk_windows(tokens, token_doc, ids_QxK, M, 2 * M, query_QxM)
  assert win_QxKxR[0, 0].tolist() == passage
  assert win_QxKxR[1, 1].tolist() == [0] * (2 * M)
  plain = core.chunk_windows(tokens, token_doc, ids_QxK, M, 2 * M)
  np.testing.assert_array_equal(win_QxKxR[0, 1], plain[0, 1])


def test_align_never_leaves_the_document_and_prefers_small_shifts():
  """A passage at the end of document 0 is found, and tokens past its end stay padding;
  a periodic chunk matching at several shifts takes the one nearest 0; padding in the
  query never matches."""
  passage = list(range(50, 50 + M))
  tokens, token_doc = _stream([5] * (M - 2) + passage, passage + [6] * (2 * M))
  query = np.asarray([passage], np.int32)
  win = core.chunk_windows(tokens, token_doc, np.asarray([[0]]), M, 2 * M, query)[0, 0]
  assert win.tolist() == passage + [0] * M  # shift +M-2, cut at the document's end
  periodic_T = np.tile(np.asarray([1, 2], np.int32), 4 * M)
  shift = core.align_offsets(periodic_T, np.zeros_like(periodic_T), np.asarray([[2 * M]]),
                             np.tile(np.asarray([[1, 2]], np.int32), (1, M // 2)))
  assert shift.tolist() == [[0]]
  padded = np.zeros((1, M), np.int32)
  assert core.align_offsets(tokens, token_doc, np.asarray([[0]]), padded).tolist() == [[0]]


def test_query_tokens_are_the_window_tail_left_padded():
  tokens_T = np.arange(1, 41, dtype=np.int32)
  first_Q, end_Q = neighbours.query_windows(16, 8, 12, 0, 2)  # windows clipped at seq start
  q_QxM = neighbours.query_tokens(tokens_T, first_Q, end_Q, 4)
  assert q_QxM[0].tolist() == [5, 6, 7, 8] and q_QxM[2].tolist() == [21, 22, 23, 24]
  short = neighbours.query_tokens(tokens_T, np.asarray([6]), np.asarray([8]), 4)
  assert short.tolist() == [[0, 0, 7, 8]]
