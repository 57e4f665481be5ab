"""engine/draft_guard.py on scripted round times: the verdict per batch size, its probes and
refreshes, and the margin."""
from __future__ import annotations

import re

from engine.draft_guard import MIN_ROUNDS, PROBE_BURST, PROBE_EVERY, REFRESH_EVERY, DraftGuard


def run(guard: DraftGuard, rounds: int, drafted_round: tuple[float, int],
        plain_round: tuple[float, int], size: int = 1) -> str:
    """Serve `rounds` rounds at one size; each drafted one takes drafted_round (seconds, tokens),
    each plain one plain_round. -> 'D' for drafted, '.' for plain, in order."""
    out = []
    for _ in range(rounds):
        draft = guard.pays(size)
        seconds, tokens = drafted_round if draft else plain_round
        guard.observe(size, draft, seconds, tokens)
        out.append("D" if draft else ".")
    return "".join(out)


def test_losing_drafting_is_probed_every_sixteenth_round():
    """A probe is PROBE_BURST drafted rounds in a row; only its last one is timed."""
    guard = DraftGuard()
    # drafted: 1.5 tokens in 4.3 ms (349 tok/s); plain: 1 token in 2.3 ms (435 tok/s): the H200
    seq = run(guard, 200, (0.0043, 3), (0.0023, 2))
    learned = seq.index("." * (PROBE_EVERY - 1))
    assert seq[:MIN_ROUNDS] == "D" * MIN_ROUNDS and learned < 3 * MIN_ROUNDS
    steady = seq[learned:]
    probes = re.findall("D+", steady)
    gaps = re.findall(r"\.+", steady.strip("."))  # the plain runs between probes
    assert len(probes) >= 9 and set(probes) == {"D" * PROBE_BURST}
    assert set(gaps) == {"." * (PROBE_EVERY - 1)}
    assert guard.forced_plain == seq.count(".")
    timed = guard.sizes[1].drafted.rounds  # a probe's first rounds are not timed
    assert timed == seq.count("D") - (PROBE_BURST - 1) * len(probes)


def test_a_probes_first_rounds_are_not_timed():
    """Its first rounds run with a stale capacity and a context backlog: a slow first round
    must not keep the verdict at "plain" when steady drafting wins."""
    guard = DraftGuard()
    run(guard, 40, (0.0043, 1), (0.0023, 1))  # drafting loses: only probes draft
    out = []
    for _ in range(120):  # now a probe's first rounds are slow, its steady rounds fast
        draft = guard.pays(1)
        s = guard.sizes[1]
        first = draft and s.untimed > 0
        seconds, tokens = ((0.02, 1) if first else (0.003, 2)) if draft else (0.0023, 1)
        guard.observe(1, draft, seconds, tokens)
        out.append("D" if draft else ".")
    assert "".join(out)[-40:].count("D") >= 38


def test_winning_drafting_keeps_drafting_with_plain_refreshes():
    guard = DraftGuard()
    seq = run(guard, 300, (0.003, 2), (0.0023, 1))  # 667 against 435 tok/s
    steady = seq[3 * MIN_ROUNDS:]
    assert steady.count(".") in (len(steady) // REFRESH_EVERY, len(steady) // REFRESH_EVERY + 1)
    assert ".." not in steady


def test_a_loss_inside_the_margin_keeps_drafting():
    guard = DraftGuard()
    seq = run(guard, 100, (0.00101, 1), (0.001, 1))  # 1% slower: noise, not a verdict
    assert seq[3 * MIN_ROUNDS:].count(".") <= 100 // REFRESH_EVERY + 1


def test_the_verdict_follows_a_change_and_each_size_has_its_own():
    guard = DraftGuard()
    run(guard, 100, (0.003, 2), (0.0023, 1), size=4)
    losing = run(guard, 100, (0.0043, 1), (0.0023, 1), size=8)
    assert losing[3 * MIN_ROUNDS:].count("D") <= PROBE_BURST * (100 // PROBE_EVERY + 1)
    assert run(guard, 40, (0.003, 2), (0.0023, 1), size=4).count("D") >= 38
    # drafting at size 8 starts paying: the probes' fresh rates turn the verdict back
    later = run(guard, 200, (0.003, 4), (0.0023, 1), size=8)
    assert later[-60:].count("D") >= 57
    assert guard.rates(2) == (0.0, 0.0)
