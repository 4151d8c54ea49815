"""Timing shared by the PyTorch benchmark scripts."""
import statistics
import time


def median_seconds(fn, min_time, reps=5):
    """Median over reps samples of fn's time per call; each sample repeats fn for min_time / reps
    seconds, after one warm-up call."""
    fn()
    samples = []
    for _ in range(reps):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time / reps:
                break
        samples.append(elapsed / n)
    return statistics.median(samples)
