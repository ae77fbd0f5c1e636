"""The notebooks' exercise checkers (ringbook.exercises): solutions pass, plausible wrong answers fail, stubs wait."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ringbook import exercises

SOLUTIONS = Path(__file__).resolve().parents[1] / "notebooks" / "solutions"
STUB_NAME = {"merge_partials": "my_merge"}  # the notebook's stub name, where it differs from the checker's


def _solutions():
    found = {}
    for path in sorted(SOLUTIONS.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"solutions_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found.update({name: getattr(module, STUB_NAME.get(name, name)) for name in exercises.CHECKERS
                      if hasattr(module, STUB_NAME.get(name, name))})
    return found


def test_every_checker_has_a_solution():
    assert set(_solutions()) == set(exercises.CHECKERS)


@pytest.mark.parametrize("name", sorted(exercises.CHECKERS))
def test_solution_passes_its_checker(name, capsys):
    assert exercises.CHECKERS[name](_solutions()[name]) is True
    assert capsys.readouterr().out.startswith(f"✓ {name}")


@pytest.mark.parametrize("name", sorted(exercises.CHECKERS))
def test_a_stub_is_not_attempted_yet_and_does_not_fail(name, capsys):
    def stub(*args):
        raise NotImplementedError

    assert exercises.CHECKERS[name](stub) is None
    assert exercises.NOT_ATTEMPTED in capsys.readouterr().out



WRONG = {  # plausible mistakes, each with the words its hint must contain
    "lse_from_m_l": [(lambda m, l: torch.log(l), "added back"),  # forgot the maximum
                     (lambda m, l: torch.nan_to_num(m + torch.log(l)), "masked")],  # -1.8e308 instead of -inf
    "merge_partials": [(lambda oa, la, ob, lb: ((oa + ob) / 2, torch.logaddexp(la, lb)), "plain average"),
                       (lambda oa, la, ob, lb: ((torch.exp(la)[:, None] * oa + torch.exp(lb)[:, None] * ob)
                                                / (torch.exp(la) + torch.exp(lb))[:, None],
                                                torch.log(torch.exp(la) + torch.exp(lb))), "overflows"),
                       (lambda oa, la, ob, lb: (torch.exp(la - torch.logaddexp(la, lb))[:, None] * oa
                                                + torch.exp(lb - torch.logaddexp(la, lb))[:, None] * ob,
                                                torch.logaddexp(la, lb)), "empty")],
    "online_step": [(lambda m, l, acc, s, v: (torch.maximum(m, s.amax(1)), l + torch.exp(s).sum(1),
                                              acc + torch.exp(s) @ v), "never s itself"),
                    (lambda m, l, acc, s, v: (lambda mn: (mn, l * torch.exp(m - mn) + torch.exp(s - mn[:, None]).sum(1),
                                                          acc * torch.exp(m - mn)[:, None] + torch.exp(s - mn[:, None]) @ v))(
                        torch.maximum(m, s.amax(1))), "masked")],
    "zigzag_positions": [(lambda n, w, r: list(range(r * n // w, (r + 1) * n // w)), "2·world chunks"),
                         (lambda n, w, r: list(range(r * n // (2 * w), (r + 1) * n // (2 * w)))
                          + list(range((2 * w - r) * n // (2 * w), (2 * w - r + 1) * n // (2 * w))), "one early and one late")],
    "causal_skip": [(lambda r, t, w: t >= r, "diagonal"),  # skips the diagonal step of rank 0
                    (lambda r, t, w: (r - t) % w < r, "later rank")],  # the direction reversed
    "kept_positions": [(lambda n, s, r, o: list(range(o, s, r)), "every segment"),  # the first segment only
                       (lambda n, s, r, o: [p for p in range(n) if p % s % r == o + 1], "offset")],
}


@pytest.mark.parametrize("name, index", [(n, i) for n, ws in WRONG.items() for i in range(len(ws))])
def test_checker_rejects_a_plausible_wrong_answer_with_a_hint(name, index, capsys):
    wrong, words = WRONG[name][index]
    assert exercises.CHECKERS[name](wrong) is False
    out = capsys.readouterr().out
    assert out.startswith(f"✗ {name}: fails on") and "expected:" in out and "got:" in out and words in out, out


def test_a_checker_refuses_what_is_not_a_function():
    with pytest.raises(TypeError, match="check_merge_partials takes your function"):
        exercises.check_merge_partials(3)


def test_a_crashing_answer_is_reported_not_raised(capsys):
    assert exercises.check_kept_positions(lambda *a: 1 / 0) is False
    assert "ZeroDivisionError" in capsys.readouterr().out
    for name, checker in exercises.CHECKERS.items():  # an answer of the wrong type is a wrong answer, not a crash
        assert checker(lambda *a: None) is False, name
        assert checker(lambda *a: "text") is False, name


def test_teacher_build_fills_every_stub_of_every_notebook():
    import sys

    sys.path.insert(0, str(SOLUTIONS.parents[1] / "tools"))
    import jupytext
    import teacher_build

    stubs = 0
    for source in sorted(SOLUTIONS.parent.glob("0*.py")):
        nb = jupytext.read(source, fmt="py:percent")
        before = sum("raise NotImplementedError" in c.source for c in nb.cells if c.cell_type == "code")
        filled = teacher_build.fill(nb, teacher_build.solutions(source.stem))
        assert len(filled) == before, source.name
        assert not any("raise NotImplementedError" in c.source for c in nb.cells if c.cell_type == "code")
        assert all("check_" in c.source for c in nb.cells if c.cell_type == "code" and any(
            f"def {name}(" in c.source for name in filled))  # the checker call is kept
        stubs += before
    assert stubs == len(exercises.CHECKERS)  # every exercise appears in a notebook, once


# Notebooks 01 and 02: the checkers' fixes (issue 22) and the new ring exercises, each shown rejecting wrong answers.

def _online_step_without_max_in_float64(m, l, acc, s, v):
    """Right in exact arithmetic, never overflows in float64, but l and acc are not relative to m."""
    s64, v64 = s.double(), v.double()
    return torch.maximum(m, s.amax(1)), l + torch.exp(s64).sum(1), acc + torch.exp(s64) @ v64


def _ring_without_rotation(q, k, v, w):  # every rank attends its own shard w times
    c = q.shape[0] // w
    out, lse = [], []
    for r in range(w):
        s = q[r * c:(r + 1) * c] @ k[r * c:(r + 1) * c].T * q.shape[1] ** -0.5
        out.append(torch.softmax(s, 1) @ v[r * c:(r + 1) * c])
        lse.append(torch.logsumexp(s, 1))
    return torch.cat(out), torch.cat(lse)


def _ring_averaging_blocks(q, k, v, w):  # meets every shard, but averages the blocks' outputs
    c, outs = q.shape[0] // w, []
    for r in range(w):
        qs = q[r * c:(r + 1) * c]
        blocks = [torch.softmax(qs @ k[s * c:(s + 1) * c].T * q.shape[1] ** -0.5, 1) @ v[s * c:(s + 1) * c]
                  for s in range(w)]
        outs.append(sum(blocks) / w)
    return torch.cat(outs), torch.logsumexp(q @ k.T * q.shape[1] ** -0.5, 1)


def _ring_backward_without_final_hop(q, k, v, out, lse, dout, w):
    dq, dk, dv = _solutions()["toy_ring_backward"](q, k, v, out, lse, dout, w)
    c = q.shape[0] // w
    return dq, torch.roll(dk, -c, 0), torch.roll(dv, -c, 0)  # each rank's dK/dV left one rank short of home


WRONG_01_02 = {  # plausible mistakes for the checkers of notebooks 01 and 02, with words their hints must contain
    "lse_from_m_l": [(lambda m, l: torch.log(l * torch.exp(m)), "float32")],  # the unsafe form: e^m overflows
    "online_step": [(_online_step_without_max_in_float64, "never s itself")],
    "merge_partials": [(lambda oa, la, ob, lb: [oa, la], "share")],  # a list is fine; keeping one side is not
    "zigzag_positions": [(lambda n, w, r: [p + 0.5 for p in _solutions()["zigzag_positions"](n, w, r)], "whole")],
    "toy_ring_attention": [(_ring_without_rotation, "every K/V shard"),
                           (_ring_averaging_blocks, "not averaged")],
    "classify_block": [(lambda qp, kp: "skip" if kp[0] > qp[-1] else "full" if kp[-1] <= qp[0] else "causal",
                        "extremes"),  # ends of the lists, not the extremes
                       (lambda qp, kp: "full" if kp.max() < qp.min() else "skip" if kp.min() > qp.max() else "causal",
                        "visible"),  # the diagonal key hidden
                       (lambda qp, kp: kp.max() <= qp.min(), "one of the strings")],
    "toy_ring_backward": [(_ring_backward_without_final_hop, "final hop")],
    "overlap_threshold": [(lambda f, b, e, causal: e * f / (4 * b) * (2 if causal else 1), "K and V"),
                          (lambda f, b, e, causal: e * f / (2 * b), "causal")],
}


def _solution(name):
    return _solutions()[name]


WRONG_03_TO_05 = {  # notebooks 03-05: plausible mistakes, each with the words its hint must contain
    "kept_positions": [(lambda n, s, r, o: [p + 0.5 for p in range(n) if p % s % r == o], "integers"),
                       (lambda n, s, r, o: [p for p in range(n) if p % s == o], "mod rate")],
    "pair_scores": [(lambda n, s, r, c: n * s // r**2 // (2 if c else 1), "m(m+1)/2"),  # halves instead of counting
                    (lambda n, s, r, c: n * s // r, "m²")],
    "rows_sent": [(lambda n, w, s, r, o, c: _solution("rows_sent")(n, w, s, r, o, False), "later"),  # mask ignored
                  (lambda n, w, s, r, o, c: _solution("rows_sent")(n, w, s, 1, 0, c), "offset mod rate")],
    "passes_2x_rule": [(lambda o, r, b, a: bool((o.double() - r).abs().nan_to_num(0).max() <= 2 * (
        b.double() - r).abs().nan_to_num(0).max() + a), "NaN never passes"),
                       (lambda o, r, b, a: bool((o.double() - r).abs().max() <= 2 * (b.double() - r).abs().max() + a),
                        "where ref is finite")],
    "overflow_inputs": [(lambda q, k, v: (q, k, v), "mutant passes"),
                        (lambda q, k, v: (q * 1e4, k, v), "even the right kernel fails")],
    "catches_bugs": [(lambda attention: True, "large enough to overflow")],
    "row_tflops": [(lambda r: 4 * r["batch"] * r["heads"] * r["seq_len"] ** 2 * r["head_dim"] / r["time_ms"] / 1e12,
                    "milliseconds"),
                   (lambda r: _solution("row_tflops")(dict(r, causal=False)), "half the work")],
    "counts_as_result": [(lambda r: r["status"] == "ok", "all four rules"),
                         (lambda r: int(_solution("counts_as_result")(r)), "a bool")],
    "ideal_speedup": [(lambda n, w, c: float(w), "slowest rank"),
                      (lambda n, w, c: float(w) * (1.2 if c else 1), "slowest rank")],
}


def test_checkers_01_02_accept_right_answers_in_another_form(capsys):
    sol = _solutions()
    import numpy as np

    assert exercises.check_causal_skip(lambda r, t, w: torch.tensor(sol["causal_skip"](r, t, w))) is True
    assert exercises.check_causal_skip(lambda r, t, w: np.bool_(sol["causal_skip"](r, t, w))) is True
    assert exercises.check_merge_partials(lambda *a: list(sol["merge_partials"](*a))) is True
    assert exercises.check_zigzag_positions(lambda *a: torch.tensor(sol["zigzag_positions"](*a))) is True
    assert exercises.check_zigzag_positions(lambda *a: np.array(sol["zigzag_positions"](*a))) is True
    assert exercises.check_toy_ring_attention(lambda *a: list(sol["toy_ring_attention"](*a))) is True
    capsys.readouterr()


def test_checkers_never_print_the_same_expected_and_got(capsys):
    assert exercises.check_causal_skip(lambda r, t, w: "False" if t else "True") is False
    out = capsys.readouterr().out
    expected = out.split("expected: ")[1].splitlines()[0]
    got = out.split("got:      ")[1].splitlines()[0]
    assert expected != got, out


def test_not_implemented_on_a_later_case_is_a_failure(capsys):
    def half_done(rank, step, world):
        if world > 1:
            raise NotImplementedError
        return False

    assert exercises.check_causal_skip(half_done) is False
    out = capsys.readouterr().out
    assert "NotImplementedError" in out and exercises.NOT_ATTEMPTED not in out, out


def test_online_step_failure_shows_the_learners_own_arguments(capsys):
    assert exercises.check_online_step(_online_step_without_max_in_float64) is False
    out = capsys.readouterr().out
    inputs = out.split("inputs:   ")[1].splitlines()[0]
    assert inputs.count("[") >= 5 and "tensor of shape" not in inputs, out  # m, l, acc, s, v as values


def test_hints_01_02_do_not_print_the_solution(capsys):
    for name, wrongs in {**WRONG, **WRONG_01_02}.items():
        if name == "kept_positions":
            continue  # notebook 03's checker
        for wrong, _ in wrongs:
            exercises.CHECKERS[name](wrong)
    out = capsys.readouterr().out
    for formula in ("m + log", "2·world − 1 − r", "(r − t) mod w > r", "torch.logaddexp", "e·F / (2·B)"):
        assert formula not in out, formula


def test_notebooks_03_to_05_bool_answers_may_be_numpy_or_torch(capsys):
    import numpy as np

    for name in ("counts_as_result", "passes_2x_rule"):
        right = _solution(name)
        assert exercises.CHECKERS[name](lambda *a, f=right: np.bool_(f(*a))) is True
        assert exercises.CHECKERS[name](lambda *a, f=right: torch.tensor(f(*a))) is True


# Notebook 06: plausible wrong answers for the strategies' checkers, with words their hints must contain.

def _sol06(name):
    return _solutions()[name]


WRONG_06 = {
    "step_bytes": [
        (lambda s, n, w, h, g, d, e: [2 * (n // w) * g * d * e] * w if s == "ring" else _sol06("step_bytes")(
            s, n, w, h, g, d, e), "every step but the last"),  # a ring hop after the last step too
        (lambda s, n, w, h, g, d, e: [2 * (n // w) * g * d * e * w] if s == "allgather" else _sol06("step_bytes")(
            s, n, w, h, g, d, e), "w − 1"),  # all-gather counting the rank's own shard
        (lambda s, n, w, h, g, d, e: [(w - 1) * (n // w) * (h + 2 * g) // w * d * e, (w - 1) * (n // w) * h // w * d * e]
         if s == "ulysses" and w > 1 else _sol06("step_bytes")(s, n, w, h, g, d, e), "kv head of its own"),
    ],
    "ulysses_heads": [
        (lambda h, g, w, r: _sol06("ulysses_heads")(h, g, w, r) if h % w == 0 else ([], []), "raise ValueError"),
        (lambda h, g, w, r: (list(range(r * h // w, (r + 1) * h // w)), list(range(r * g // w, (r + 1) * g // w))),
         "a copy"),  # kv heads split like q heads: no replication when kv_heads < world
    ],
    "usp_groups": [
        (lambda w, u, r: (list(range(r % u, w, u)), list(range(r // u * u, r // u * u + u))), "consecutive"),
        (lambda w, u, r: (list(range(r // u * u, r // u * u + u)), list(range(r // u, w, w // u))), "same member"),
    ],
}


# Notebook 08: plausible wrong answers for the cost model's checkers, with words their hints must contain.

def _sol08(name):
    return _solutions()[name]


WRONG_08 = {
    "hide_tokens": [
        (lambda f, b, h, g, e, causal: 2 * g * e * f / (4 * h * b), "half the block"),  # causal ignored
        (lambda f, b, h, g, e, causal: 2 * h * e * f / (4 * h * b * (0.5 if causal else 1)), "kv_heads"),  # no GQA
    ],
    "hop_bytes": [
        (lambda n, w, u, h, g, d, e: 2 * (n // w) * g * d * e, "chunk"),  # the rank's own tokens, all kv heads
        (lambda n, w, u, h, g, d, e: (n // (w // u)) * (g // u or 1) * d * e, "K and V"),  # only K
    ],
    "cluster_winner": [
        (lambda w, n, h, g, m: "ring (contiguous)", "last rank"),
        (lambda w, n, h, g, m: "ring (zigzag)", "compare"),
    ],
}


# Notebook 07: plausible wrong answers for the mask checkers, with words their hints must contain.

def _sol07(name):
    return _solutions()[name]


def _imbalance_with(positions, ids, causal, reduce):
    """Needed work per rank from the solution's mask, reduced the wrong way."""
    n = ids.numel()
    i, j = positions[:, :, None], torch.arange(n)[None, None, :]
    seen = (ids[i] == ids[j]) & ((j <= i) if causal else True)
    return reduce(seen.sum(dim=(1, 2)).double()).item()


WRONG_07 = {
    "document_block": [
        (lambda q, k, ids, causal: _sol07("document_block")(q, k, ids, False), "causal"),  # causal forgotten
        (lambda q, k, ids, causal: "empty" if ids[q[0]] != ids[k[0]] else _sol07("document_block")(q, k, ids, causal),
         "first and last token"),  # empty whenever the first tokens' documents differ
        (lambda q, k, ids, causal: "partial" if _sol07("document_block")(q, k, ids, causal) == "full"
         and q != k else _sol07("document_block")(q, k, ids, causal), "share one"),  # off-diagonal never full
    ],
    "window_hops": [
        (lambda n, w, W: min(w - 1, -(-W // (n // w))), "window − 1 keys before it"),  # ⌈W/c⌉
        (lambda n, w, W: -(-(W - 1) // (n // w)), "w − 1 other shards"),  # not capped at w − 1
        (lambda n, w, W: w - 1, "first query of rank r"),  # every hop, as a mask-blind ring
    ],
    "layout_imbalance": [
        (lambda pos, ids, causal: _imbalance_with(pos, ids, causal, lambda x: x.max() / x.min()), "mean"),
        (lambda pos, ids, causal: _sol07("layout_imbalance")(pos, torch.zeros_like(ids), causal),
         "its own document"),  # the document mask forgotten
        (lambda pos, ids, causal: _sol07("layout_imbalance")(pos, ids, not causal), "at or before it"),
    ],
}


# Every later notebook's checkers: plausible wrong answers (the tables above), each rejected with its hint's words.
WRONG_BY_NOTEBOOKS = {"01-02": WRONG_01_02, "03-05": WRONG_03_TO_05, "06": WRONG_06, "07": WRONG_07, "08": WRONG_08}


@pytest.mark.parametrize("notebooks, name, index", [(nb, n, i) for nb, table in WRONG_BY_NOTEBOOKS.items()
                                                     for n, ws in table.items() for i in range(len(ws))])
def test_checkers_reject_plausible_wrong_answers(notebooks, name, index, capsys):
    wrong, words = WRONG_BY_NOTEBOOKS[notebooks][name][index]
    assert exercises.CHECKERS[name](wrong) is False
    out = capsys.readouterr().out
    assert out.startswith(f"✗ {name}: fails on") and words in out, out
