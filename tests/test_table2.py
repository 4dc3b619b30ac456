"""Table 2's inference timing (cdul_ray.table2.images_per_second): what it times and how it rejects too few images."""

from __future__ import annotations

import time

import pytest

from cdul_ray import table2


def test_images_per_second_times_every_step_interleaved_after_a_warm_up_batch():
    calls: list[tuple[str, int]] = []

    def step(name: str, seconds: float):
        def run(uris: list[str]) -> None:
            calls.append((name, len(uris)))
            time.sleep(seconds)
        return run

    uris = [f"u{i}" for i in range(4 * 3 + 2)]  # batches of 4: warm-up, 4, 4, 2 timed images = 10
    rate = table2.images_per_second({"slow": step("slow", 0.05), "fast": step("fast", 0.01)}, uris, batch_size=4,
                                    rounds=2)
    # each pass: warm-up + 3 timed batches per step, the steps interleaved pass by pass
    assert calls == ([("slow", 4), ("slow", 4), ("slow", 4), ("slow", 2)]
                     + [("fast", 4), ("fast", 4), ("fast", 4), ("fast", 2)]) * 2
    # sleep is a lower bound on each batch: 10 images in >= 3 x 0.05 s, >= 3 x 0.01 s
    assert 0 < rate["slow"] <= 10 / 0.15
    assert 0 < rate["fast"] <= 10 / 0.03
    assert rate["fast"] > rate["slow"]


@pytest.mark.parametrize("n, rounds", [(4, 1), (0, 1), (9, 0)])
def test_images_per_second_refuses_what_it_cannot_time(n, rounds):
    with pytest.raises(ValueError):
        table2.images_per_second({"s": lambda uris: None}, [f"u{i}" for i in range(n)], batch_size=4, rounds=rounds)
