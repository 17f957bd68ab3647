"""Where the time of one GPU forward goes: kernel times from torch.profiler, per stage.

    python3 scripts/profile_forward.py --tokens 1 128 4096      (1 GPU, EP1, dsv3 shape)
    ncu -k regex:_l1_kernel --launch-skip 1 --launch-count 1 python3 scripts/profile_forward.py --ncu --tokens 4096

With programmatic dependent launch (the default, `nvshmem_backend.USE_PDL`) a kernel starts
before its predecessor ends and waits for it, so its profiled time includes that wait: pass
--no-pdl for per-kernel times (the whole-forward time is measured either way).
"""
import argparse
import socket

import torch
import torch.distributed as dist

import mega_moe_layer as mml


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 4096])
    p.add_argument("--experts", type=int, default=64, help="E (all local on one GPU)")
    p.add_argument("--no-pdl", action="store_true", help="launch without programmatic dependent launch")
    p.add_argument("--no-stage-rebase", action="store_true",
                   help="rebase FP8 x in a pass after the dispatch (`nvshmem_backend.STAGE_REBASE` = False)")
    p.add_argument("--no-over", action="store_true",
                   help="no tile plans with rows past block_m (`nvshmem_backend.USE_OVER` = False)")
    p.add_argument("--ncu", action="store_true",
                   help="for Nsight Compute: three plain forwards per T (no CUDA graph, no torch.profiler), e.g. "
                        "ncu -k regex:_l1_kernel --launch-skip 1 --launch-count 1 ... --ncu --tokens 4096")
    args = p.parse_args()
    from mega_moe_layer import nvshmem_backend
    nvshmem_backend.STAGE_REBASE = nvshmem_backend.STAGE_REBASE and not args.no_stage_rebase
    nvshmem_backend.USE_PDL = nvshmem_backend.USE_PDL and not args.no_pdl
    nvshmem_backend.USE_OVER = nvshmem_backend.USE_OVER and not args.no_over
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    cfg = mml.MegaMoEConfig(hidden=7168, intermediate=2048, num_experts=args.experts, topk=8,
                            max_tokens_per_rank=max(args.tokens))
    m = mml.MegaMoEExperts(cfg, backend="nvshmem", validate=False)
    E, H, I = cfg.num_experts, cfg.hidden, cfg.intermediate
    m.load_weights((torch.randn(E, 2 * I, H, device="cuda") * H ** -0.5).bfloat16(),
                   (torch.randn(E, H, I, device="cuda") * I ** -0.5).bfloat16())
    for T in args.tokens:
        x = torch.randn(T, H, device="cuda").bfloat16()
        idx = torch.rand(T, E, device="cuda").argsort(1)[:, :8].contiguous()
        w = torch.rand(T, 8, device="cuda")
        if args.ncu:
            m._backend.use_graphs = False
        for _ in range(3):
            m(x, idx, w)
        torch.cuda.synchronize()
        if args.ncu:
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                m(x, idx, w)
            torch.cuda.synchronize()
        print(f"\n=== T={T}, E={E} (per 5 calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50))
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10):
            m(x, idx, w)
        b.record()
        torch.cuda.synchronize()
        print(f"T={T}: {a.elapsed_time(b) / 10 * 1e3:.1f} us per forward (back to back)")
    from mega_moe_layer.comm import workspace as wsm
    wsm.destroy_all_workspaces()


if __name__ == "__main__":
    main()
