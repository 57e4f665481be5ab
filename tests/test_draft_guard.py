"""engine/draft_guard.py on scripted round times: the verdict per batch size, its probes and
refreshes, and the margin."""
from __future__ import annotations

from engine.draft_guard import MIN_ROUNDS, PROBE_EVERY, REFRESH_EVERY, DraftGuard


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
    guard = DraftGuard()
    # drafted: 1.5 tokens in 4.3 ms (349 tok/s); plain: 1 token in 2.3 ms (435 tok/s): the H200
    seq = run(guard, 200, (0.0043, 3), (0.0023, 2))
    learned = seq.index("." * (PROBE_EVERY - 1))
    assert seq[:MIN_ROUNDS] == "D" * MIN_ROUNDS and learned < 3 * MIN_ROUNDS
    steady = seq[learned:]
    assert steady.count("D") in (len(steady) // PROBE_EVERY, len(steady) // PROBE_EVERY + 1)
    assert "DD" not in steady
    assert guard.forced_plain == seq.count(".")


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
    assert losing[3 * MIN_ROUNDS:].count("D") <= 100 // PROBE_EVERY + 1
    assert run(guard, 40, (0.003, 2), (0.0023, 1), size=4).count("D") >= 38
    # drafting at size 8 starts paying: the probes' fresh rates turn the verdict back
    later = run(guard, 200, (0.003, 4), (0.0023, 1), size=8)
    assert later[-60:].count("D") >= 57
    assert guard.rates(2) == (0.0, 0.0)
