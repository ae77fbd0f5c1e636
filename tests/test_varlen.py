"""The variable-length launches of a masked block (ringbook.fast.varlen) compute exactly its mask.

The CUDA kernel is replaced by its definition (``reference_varlen``: a band
aligned at the bottom right of each sequence), so the cutting into pieces, the
trimming and the bands are checked on the CPU against the einops block in
float64: every row's out and lse, rows that see no key included.
"""

from __future__ import annotations

import pytest
import torch

from ringbook.fast import varlen
from ringbook.online_softmax import attend_block


def _ids(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def _check(q_pos, k_pos, *, causal, window=None, ids=None, batch=2):
    g = torch.Generator().manual_seed(int(q_pos.sum() + 7 * k_pos.sum()))
    q = torch.randn(batch, q_pos.numel(), 2, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, k_pos.numel(), 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    q_doc = None if ids is None else ids[:, q_pos]
    k_doc = None if ids is None else ids[:, k_pos]
    launches = varlen.pieces(q_pos, k_pos, causal=causal, q_doc=q_doc, k_doc=k_doc, window=window, batch=batch)
    assert launches is not None
    for x in launches:  # the kernel reads a bound of -1 as "none": every written bound is one
        assert x.left >= -1 and x.right >= -1
    out, lse = varlen.varlen_forward(q, k, v, launches, scale=0.3, kernel=varlen.reference_varlen)
    want_out, want_lse = attend_block(q, k, v, scale=0.3, causal=causal, q_pos=q_pos, k_pos=k_pos, q_doc=q_doc,
                                      k_doc=k_doc, window=window)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    torch.testing.assert_close(lse.nan_to_num(neginf=0), want_lse.nan_to_num(neginf=0), rtol=1e-12, atol=1e-12)
    return launches


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 1, 5, 40])
def test_documents_and_windows_on_and_off_the_diagonal(causal, window):
    lengths = [5, 1, 9, 3, 14]  # 32 tokens, a document of one, one spanning both blocks
    ids = torch.stack([_ids(lengths), _ids([16, 16])])  # batch rows with different documents
    r = torch.arange
    for q_pos, k_pos in ((r(16, 32), r(16, 32)), (r(16, 32), r(0, 16)), (r(20, 28), r(4, 24)), (r(0, 16), r(16, 32))):
        _check(q_pos, k_pos, causal=causal, window=window, ids=ids)
        _check(q_pos, k_pos, causal=causal, window=window)  # one document


def test_a_zigzag_shard_of_queries_is_two_runs():
    q_pos = torch.cat([torch.arange(4, 8), torch.arange(24, 28)])
    launches = _check(q_pos, torch.arange(0, 8), causal=True, window=6, ids=_ids([6, 26])[None].expand(2, -1))
    assert sum(x.cu_q.numel() - 1 for x in launches) >= 2


def test_launches_group_pieces_by_band_and_skip_what_no_query_sees():
    ids = _ids([8, 8, 8, 8])[None]
    (launch,) = varlen.pieces(torch.arange(32), torch.arange(32), causal=True, q_doc=ids, k_doc=ids)
    assert (launch.left, launch.right) == (-1, 0) and launch.cu_q.tolist() == [0, 8, 16, 24, 32]  # one launch
    assert launch.q_span == launch.k_span == (0, 32)  # one run of rows: slices of the block, no gather
    (cut,) = varlen.pieces(torch.arange(32), torch.arange(32), causal=True, window=4, q_doc=ids, k_doc=ids)
    assert cut.q_span == (0, 32) and cut.k_span == (0, 32)
    (gap,) = varlen.pieces(torch.arange(8, 16), torch.arange(0, 16), causal=False, window=2, q_doc=ids[:, 8:16],
                           k_doc=ids[:, :16])  # keys 6, 7 (document 0) are dropped: only document 1's run is left
    assert gap.k_span == (8, 16) and gap.q_span == (0, 8)
    assert varlen._span([(0, 4), (6, 2)]) is None and varlen._span([(3, 4), (7, 2)]) == (3, 9)
    assert varlen.pieces(torch.arange(16, 32), torch.arange(0, 16), causal=True, q_doc=ids[:, 16:],
                         k_doc=ids[:, :16]) == []  # documents end at the block boundary: nothing to launch


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_a_document_whose_keys_sit_in_two_runs_meets_its_queries_in_two_layers(causal, window):
    k_pos = torch.cat([torch.arange(0, 4), torch.arange(12, 16)])  # one document, keys in two runs
    launches = _check(torch.arange(4, 12), k_pos, causal=causal, window=window)
    if not causal and window is None:
        assert sorted(x.layer for x in launches) == [0, 1]
    # a shard dealt head and tail (each document's first and last chunk), against the same shard
    ids = _ids([8, 8, 16])
    shard = torch.cat([torch.arange(0, 2), torch.arange(6, 8), torch.arange(8, 10), torch.arange(14, 16),
                       torch.arange(16, 20), torch.arange(28, 32)])
    _check(shard, shard, causal=causal, window=window, ids=ids[None].expand(2, -1))


def test_the_kernels_lse_layouts_round_trip():
    """The kernel gives its lse unpadded (``h t``) or padded (``s h max_q``); both come back as ``t h`` rows and go
    back to the kernel's layout for its backward."""
    ids = _ids([3, 5, 2])[None]
    (launch,) = varlen.pieces(torch.arange(10), torch.arange(10), causal=True, q_doc=ids, k_doc=ids)
    rows = torch.randn(10, 2, dtype=torch.float64)
    unpadded = rows.T.contiguous()
    assert torch.equal(varlen._lse_rows(unpadded, launch), rows)
    assert torch.equal(varlen._lse_kernel(rows, launch, unpadded), unpadded)
    padded = torch.zeros(3, 2, launch.max_q, dtype=torch.float64)
    back = varlen._lse_kernel(rows, launch, padded)
    assert back.shape == padded.shape and torch.equal(back[1, :, :5], rows[3:8].T)  # the second document's rows
    assert torch.equal(varlen._lse_rows(back, launch), rows)


@pytest.mark.parametrize("docs,window", [([7, 1, 9, 3, 10], None), ([7, 1, 9, 3, 10], 4), (None, 4), (None, 9),
                                         ([15, 15], None)])
def test_the_fused_path_of_production_is_exact_with_the_kernel_replaced_by_its_definition(monkeypatch, docs, window):
    """Production's masked blocks on the fused path (stacked ranks, slices, one launch per band), on the CPU:
    the CUDA kernel swapped for its definition, batch 2 (every batch row's pieces launched), ring sizes 1–5."""
    import functools

    import ringbook
    from ringbook.fast import blocks

    monkeypatch.setattr(blocks, "fused_ok", lambda q, backend: backend != "einops")
    monkeypatch.setattr(varlen, "varlen_forward", functools.partial(varlen.varlen_forward,
                                                                    kernel=varlen.reference_varlen))
    ids = None if docs is None else _ids(docs)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 30, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for causal in (True, False):
        want, want_lse = ringbook.naive_attention(q, k, v, causal=causal, document_ids=ids, window=window)
        for w, layout in ((1, "zigzag"), (3, "zigzag"), (5, "contiguous"), (5, "zigzag")):
            with torch.no_grad():
                out, lse = ringbook.production_ring_attention(q, k, v, ring_size=w, causal=causal, layout=layout,
                                                              document_ids=ids, window=window)
            case = f"docs={docs} window={window} causal={causal} w={w} {layout}"
            torch.testing.assert_close(out.double(), want, rtol=1e-10, atol=1e-10, msg=case)
            assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)), case


@pytest.mark.parametrize("window", [None, 3])
def test_the_fused_path_with_the_head_tail_layout(monkeypatch, window):
    """layout="doc_headtail" on the fused path (kernel replaced by its definition): every rank's whole shard is
    one masked block whose documents' keys sit in two runs (two layers), stacked over the ranks of a step."""
    import ringbook
    from ringbook.fast import blocks

    monkeypatch.setattr(blocks, "fused_ok", lambda q, backend: backend != "einops")
    calls = []

    def forward(*args, **kwargs):
        calls.append(sorted({x.layer for x in args[3]}))
        return varlen_forward(*args, kernel=varlen.reference_varlen, **kwargs)

    varlen_forward = varlen.varlen_forward
    monkeypatch.setattr(varlen, "varlen_forward", forward)
    ids = _ids([8, 8, 16])
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 32, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for causal in (True, False):
        want, _ = ringbook.naive_attention(q, k, v, causal=causal, document_ids=ids, window=window)
        with torch.no_grad():
            out, _ = ringbook.production_ring_attention(q, k, v, ring_size=2, causal=causal, layout="doc_headtail",
                                                        document_ids=ids, window=window)
        torch.testing.assert_close(out.double(), want, rtol=1e-10, atol=1e-10)
    assert [0, 1] in calls  # the layers ran


def test_stacked_launches_keep_each_rank_in_its_rows():
    ids = _ids([8, 8, 8, 8])[None]
    a = varlen.pieces(torch.arange(0, 16), torch.arange(0, 16), causal=True, q_doc=ids[:, :16], k_doc=ids[:, :16])
    b = varlen.pieces(torch.arange(16, 32), torch.arange(16, 32), causal=True, q_doc=ids[:, 16:], k_doc=ids[:, 16:])
    (both,) = varlen.stack([a, b], 16, 16)
    assert both.cu_q.tolist() == [0, 8, 16, 24, 32] and both.q_span == both.k_span == (0, 32)
    assert torch.equal(both.q_rows, torch.arange(32))
