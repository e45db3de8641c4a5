"""Sampling cost at a throughput batch: the Sampler (torch ops) vs the one-pass race kernel, [rows, vocab] float32.

python benchmarks/sampler_bench.py [--rows 256] [--vocab 49152]
"""

from __future__ import annotations

import argparse

import torch
from common import device_name, emit
from triton.testing import do_bench

from lmforge.engine.sampler import Sampler
from lmforge.kernels.cuda.sampling import race_sample
from lmforge.messages import GenerationConfig


class _Seq:
    def __init__(self, cfg):
        self.gen_config, self.generator, self.guide = cfg, None, None
        self.token_ids, self.num_prompt_tokens, self.num_new_tokens, self.stop_ids = [1], 1, 0, []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=49152)
    a = p.parse_args()
    dev = torch.device("cuda")
    logits = torch.randn(a.rows, a.vocab, device=dev)
    sampler = Sampler(a.vocab, dev)
    seqs = [_Seq(GenerationConfig(do_sample=True, temperature=0.6, max_new_tokens=8)) for _ in range(a.rows)]
    for s in seqs:
        s.sampling = sampler.row_info(s.gen_config)
    temp = torch.full((a.rows,), 0.6, device=dev)
    t_sampler = do_bench(lambda: sampler(logits, seqs))
    t_race = do_bench(lambda: race_sample(logits, temp))
    emit(
        device=device_name("cuda"),
        measure="sampling",
        rows=a.rows,
        vocab=a.vocab,
        sampler_ms=round(t_sampler, 4),
        race_kernel_ms=round(t_race, 4),
        race_gb_s=round(logits.numel() * 4 / t_race / 1e6, 1),
    )


if __name__ == "__main__":
    main()
