"""CUDA graphs for decode steps: one graph per batch-size bucket, captured at start, replayed with
the step's inputs copied into static buffers. Padding rows of a bucket point at the cache's trash
block, so their key/value writes land where no sequence reads.

Buckets of up to LOGITS_MAX_BS rows capture the lm_head too: a decode step samples every row, so the graph's
float32 logits are the step's logits, and a batch-1 step launches nothing between the graph and the sampler.
Only the batch-1 bucket does so: a padded bucket's lm_head GEMM runs on more rows than the eager step would,
which may pick another cuBLAS kernel and flip a bf16 near-tie against eager decoding. Larger buckets return
hidden states (their logits would hold [bs, vocab] float32 per graph)."""

from __future__ import annotations

import logging
import time

import torch

from lmforge.model_inputs import StepContext

from .decode_inputs import StaticDecodeInputs

logger = logging.getLogger(__name__)

LOGITS_MAX_BS = 1


def batch_buckets(max_batch_size: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16))
    return [s for s in sizes if s < max_batch_size] + [max_batch_size]


class CudaGraphRunner:
    """Captures and replays decode graphs of one rank. It gets only what it uses: the model's step, the KV
    cache, and the batch limits. Under tensor parallelism every rank captures the same buckets in the same order,
    so the collectives inside each graph pair up across the ranks when the graphs replay."""

    def __init__(
        self,
        step,
        cache,
        block_size: int,
        device: torch.device,
        max_batch_size: int,
        max_blocks: int,
        max_capture_s: float = 60.0,
        capture: bool = True,
    ):
        self.step = step  # model_runner.ModelStep
        self.model = step.model
        self.kv_caches = cache.kv_caches
        self.block_size = block_size
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_blocks = max_blocks
        self.inputs = StaticDecodeInputs(max_batch_size, max_blocks, block_size, device, cache.trash_block)
        self.max_kv_len = self.inputs.max_kv_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.logits: dict[int, torch.Tensor] = {}  # buckets whose graph ends in the lm_head
        self.pool = None
        support = getattr(self.model, "support_cuda_graph", True)
        self._support = support if callable(support) else (lambda *a, **k: bool(support))
        self.enabled = bool(support)
        self.capture_seconds = 0.0
        self.bucket_seconds: dict[int, float] = {}  # warm-up + capture per bucket
        if self.enabled and capture:
            self._capture_all(max_capture_s)

    def _context(self, bs: int) -> StepContext:
        # captured as if every row had the longest context: the kernels read the lengths from the buffers
        return self.inputs.context(bs, self.kv_caches, [1] * bs, [self.max_kv_len] * bs)

    def _forward(self, bs: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.step.forward(self._context(bs))
        if bs > LOGITS_MAX_BS or not self.step.has_get_logits:
            return hidden, None
        return hidden, self.step.model.get_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self, max_capture_s: float) -> None:
        start = time.perf_counter()
        buckets = sorted(batch_buckets(self.max_batch_size), reverse=True)
        try:
            for bs in buckets:
                if time.perf_counter() - start > max_capture_s:
                    logger.warning(
                        "CUDA graph capture stopped after %.0f s; smaller batches replay the smallest captured graph",
                        max_capture_s,
                    )
                    break
                t_bucket = time.perf_counter()
                self._forward(bs)  # warm-up: autotuning and lazy allocations happen outside the graph
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out, logits = self._forward(bs)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bs], self.outputs[bs] = graph, out
                if logits is not None:
                    self.logits[bs] = logits
                self.bucket_seconds[bs] = time.perf_counter() - t_bucket
        except Exception as e:  # a model op that cannot be captured: run eagerly
            logger.warning("CUDA graph capture failed (%s); decoding runs eagerly", e)
            self.graphs.clear()
            self.outputs.clear()
            self.logits.clear()
            self.enabled = False
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d CUDA graphs in %.1f s", len(self.graphs), self.capture_seconds)

    def keep_largest(self, n: int) -> None:
        """Keep only the n largest captured buckets (ranks agree on one set: capture stops on a clock, or fails,
        per rank, and ranks that replayed different buckets would pair mismatched collectives)."""
        for bs in sorted(self.graphs, reverse=True)[n:]:
            del self.graphs[bs], self.outputs[bs]
            self.logits.pop(bs, None)
        if not self.graphs:
            self.enabled = False

    def can_run(self, ctx: StepContext) -> bool:
        if not self.enabled or not ctx.is_decoding or ctx.inputs_embeds is not None:
            return False
        bs = ctx.attn_metadata.num_seqs
        return (
            bs <= self.max_batch_size
            and ctx.attn_metadata.block_tables.shape[1] <= self.max_blocks
            and self._support(input_ids=ctx.input_ids, attn_metadata=ctx.attn_metadata)
        )

    def run(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states [bs, hidden], and the float32 logits [bs, vocab] of every row where the graph holds them,
        else None). Both are the graph's static buffers: read them before the next replay."""
        bs = ctx.attn_metadata.num_seqs
        bucket = next((b for b in sorted(self.graphs) if b >= bs), None)
        if bucket is None:
            raise RuntimeError("no captured graph fits this batch")
        self.inputs.load(ctx)
        if bucket > bs:  # padding rows: one key in the trash block
            self.inputs.pad(bs, bucket)
        self.graphs[bucket].replay()
        logits = self.logits.get(bucket)
        return self.outputs[bucket][:bs], None if logits is None else logits[:bs]
