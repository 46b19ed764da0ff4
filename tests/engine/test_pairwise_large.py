"""Pairwise 20k x 20k works in row chunks: peak memory stays near the output's own size."""

import subprocess
import sys
import textwrap


def test_pairwise_20k_by_20k_memory_bounded():
    script = textwrap.dedent("""
        import resource, torch
        from lossd.engine import Engine
        from lossd.engine.inputs import random_boxes
        e = Engine(device="cpu", warm=False)
        g = torch.Generator().manual_seed(0)
        a, b = random_boxes(20000, g, torch.float32), random_boxes(20000, g, torch.float32)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = e.metric("giou", a, b, pairwise=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        i, j = 12345, 678
        ref = e.metric("giou", a[i:i+1], b[j:j+1])[0]
        assert out.shape == (20000, 20000) and abs(float(out[i, j] - ref)) < 1e-6
        print((peak - base) * 1024 / 2**20)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    grown_mib = float(res.stdout.strip().splitlines()[-1])
    output_mib = 20000 * 20000 * 4 / 2**20  # 1526 MiB of float32 results
    # the output plus the chunk temporaries; unchunked broadcasting would need ~20x the output
    assert grown_mib < output_mib + 700, grown_mib
