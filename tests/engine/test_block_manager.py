"""BlockManager and Scheduler invariants under random workloads (hypothesis), and prefix caching."""

from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import SchedulerConfig
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.scheduler import Scheduler
from lmforge.engine.sequence import SeqStatus, Sequence
from lmforge.messages import GenerationConfig

_GEN = GenerationConfig(max_new_tokens=8)


def _seq(i: int, tokens: list[int]) -> Sequence:
    return Sequence(i, f"r{i}", list(tokens), len(tokens), _GEN)


def test_allocate_and_free_roundtrip():
    bm = BlockManager(8, 4)
    s = _seq(0, list(range(9)))
    assert bm.can_allocate(s, 9)
    bm.allocate(s, 9)
    assert len(s.block_ids) == 3 and bm.num_free_blocks == 5
    bm.allocate(s, 12)  # still fits in 3 blocks
    assert len(s.block_ids) == 3
    bm.allocate(s, 13)
    assert len(s.block_ids) == 4
    bm.check_invariants([s])
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_ids == []
    bm.check_invariants([])


def test_prefix_cache_shares_full_blocks_and_keeps_last_token():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    a = _seq(0, list(range(10)))
    bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.register_full_blocks(a)  # blocks 0, 1 are full
    b = _seq(1, list(range(8)) + [99, 98, 97])
    bm.match_prefix(b)
    assert b.block_ids == a.block_ids[:2] and b.num_computed_tokens == 8
    assert bm.ref_counts[a.block_ids[0]] == 2
    c = _seq(2, list(range(8)))  # fully cached prompt: the last block is recomputed to get logits
    bm.match_prefix(c)
    assert c.num_computed_tokens == 4
    bm.check_invariants([a, b, c])
    for s in (a, b, c):
        bm.free(s)
    bm.check_invariants([])
    d = _seq(3, list(range(9)))  # cached blocks survive with ref 0 until evicted
    bm.match_prefix(d)
    assert d.num_computed_tokens == 8
    bm.free(d)
    big = _seq(4, list(range(100, 164)))
    bm.allocate(big, 64)  # needs every block: evicts the cached ones
    bm.check_invariants([big])
    e = _seq(5, list(range(9)))
    bm.match_prefix(e)
    assert e.num_computed_tokens == 0


def test_scheduler_chunks_long_prompts_under_budget():
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_batch_size=8, max_session_len=256, max_prefill_token_num=16), bm)
    s = _seq(0, list(range(40)))
    sched.add(s)
    chunks = []
    while s.num_computed_tokens < 40:
        out = sched.schedule()
        chunks.append(out.num_tokens[0])
        s.num_computed_tokens += out.num_tokens[0]
    assert chunks == [16, 16, 8]


def test_scheduler_preempts_newest_and_resumes():
    bm = BlockManager(6, 4)
    sched = Scheduler(SchedulerConfig(max_batch_size=8, max_session_len=64, max_prefill_token_num=64), bm)
    a, b = _seq(0, list(range(8))), _seq(1, list(range(8)))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.seqs == [a, b]
    for s in out.seqs:
        s.num_computed_tokens = s.num_tokens
        s.token_ids.append(1)
    # a and b hold 2 blocks each; growing both to 3 blocks needs 6: fits. Grow again: b must go.
    for _ in range(4):
        out = sched.schedule()
        for s, n in zip(out.seqs, out.num_tokens, strict=True):
            s.num_computed_tokens += n
            s.token_ids.append(1)
    out = sched.schedule()
    assert b.status is SeqStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert out.seqs == [a]
    bm.check_invariants([a, b])


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["add", "step", "abort", "finish"]), st.integers(1, 40)), max_size=60),
    num_blocks=st.integers(4, 24),
    block_size=st.sampled_from([1, 2, 4, 8]),
    prefix=st.booleans(),
)
def test_random_workload_never_leaks_or_shares_wrongly(ops, num_blocks, block_size, prefix):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    cap = num_blocks * block_size
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_session_len=cap, max_prefill_token_num=12), bm)
    live: list[Sequence] = []
    n = 0
    for op, arg in ops:
        if op == "add":
            length = min(arg, cap - 1)
            s = _seq(n, [(n * 7 + i) % 5 for i in range(length)])  # repetitive tokens exercise the prefix cache
            n += 1
            sched.add(s)
            live.append(s)
        elif op == "step":
            out = sched.schedule()
            assert len(out.seqs) <= 4
            for s, k in zip(out.seqs, out.num_tokens, strict=True):
                assert s.status is SeqStatus.RUNNING
                assert len(s.block_ids) * block_size >= s.num_computed_tokens + k
                s.num_computed_tokens += k
                bm.register_full_blocks(s)
                if s.num_computed_tokens == s.num_tokens:
                    if s.num_tokens >= cap:
                        sched.finish(s)
                        live.remove(s)
                    else:
                        s.token_ids.append(arg % 5)
        elif op in ("abort", "finish") and live:
            s = live.pop(arg % len(live))
            sched.finish(s)
        bm.check_invariants([s for s in live])
        # a block shared by two live sequences must hold the same tokens in both
        owners: dict[int, tuple] = {}
        for s in live:
            for i, blk in enumerate(s.block_ids[: s.num_computed_tokens // block_size]):
                content = tuple(s.token_ids[: (i + 1) * block_size])
                if blk in owners:
                    assert owners[blk] == content
                owners[blk] = content
    for s in live:
        sched.finish(s)
    bm.check_invariants([])
    assert bm.num_free_blocks == num_blocks
