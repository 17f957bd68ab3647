"""`_compile.wgmma_register_hazards` on small PTX programs: PTX leaves it undefined to touch a
register of a `wgmma.mma_async` (its accumulator, or its register A operand) before a
`wgmma.wait_group` retires its group, and ptxas keeps such code as written (a register A operand
rewritten for the next K step while the MMA runs). The checker must find that along loops and
branches and stay quiet where a wait came first; the kernels' compile tests assert it on their PTX
(`test_gemm.py::test_compiles`, `utils.assert_gluon_mma`)."""
from mega_moe_layer.kernels._compile import wgmma_register_hazards

_MMA = "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%r5, %r6}, {%r1, %r2, %r3, %r4}, %rd1, %p1, 1, 1;"


def _kernel(body: str) -> str:
    return (".version 8.7\n.target sm_90a\n.address_size 64\n.visible .entry k()\n{\n"
            "\t.reg .b32 %r<10>;\n" + body + "\tret;\n}\n")


def _loop(wait_in_loop: int, after_commit: str = "") -> str:
    """A K loop: the A operand (%r1..%r4) rewritten at the top of every step, one MMA per step."""
    return _kernel(
        "$L__BB0_1:\n"
        "\tld.shared.b32 %r1, [%r8];\n"
        "\twgmma.fence.sync.aligned;\n"
        f"\t{_MMA}\n"
        "\twgmma.commit_group.sync.aligned;\n"
        f"{after_commit}"
        f"\twgmma.wait_group.sync.aligned {wait_in_loop};\n"
        "\tsetp.ne.s32 %p2, %r7, 0;\n"
        "\t@%p2 bra $L__BB0_1;\n"
        "\twgmma.wait_group.sync.aligned 0;\n"
        "\tst.global.b32 [%rd2], %r5;\n")


def test_register_operand_rewritten_under_a_running_mma():
    """wait_group 1 leaves the last step's MMA running when the loop comes round and reloads %r1:
    reported on the load's line; wait_group 0 first: nothing."""
    hazards = wgmma_register_hazards(_loop(1))
    assert len(hazards) == 1 and "ld.shared.b32 %r1" in hazards[0] and "%r1" in hazards[0], hazards
    assert wgmma_register_hazards(_loop(0)) == []


def test_accumulator_read_before_its_wait():
    """Reading the accumulator (%r5) between commit and wait is reported even with wait_group 0
    after it; the same read after the wait is not."""
    early = _loop(0, after_commit="\tmov.b32 %r9, %r5;\n")
    assert any("mov.b32 %r9, %r5" in h for h in wgmma_register_hazards(early))
    late = _loop(0).replace("\tsetp.ne.s32", "\tmov.b32 %r9, %r5;\n\tsetp.ne.s32", 1)
    assert wgmma_register_hazards(late) == []


def test_one_branch_without_its_wait():
    """Only one side of a branch waits before the next step's reload: the other path is reported."""
    ptx = _kernel(
        "$L__BB0_1:\n"
        "\tld.shared.b32 %r2, [%r8];\n"
        "\twgmma.fence.sync.aligned;\n"
        f"\t{_MMA}\n"
        "\twgmma.commit_group.sync.aligned;\n"
        "\t@%p3 bra $L__BB0_2;\n"
        "\twgmma.wait_group.sync.aligned 0;\n"
        "$L__BB0_2:\n"
        "\t@%p2 bra $L__BB0_1;\n"
        "\twgmma.wait_group.sync.aligned 0;\n")
    assert len(wgmma_register_hazards(ptx)) == 1
    assert wgmma_register_hazards(ptx.replace("\t@%p3 bra $L__BB0_2;\n", "")) == []


def test_inline_assembly_labels_are_scoped():
    """Two inline-assembly wait loops with the same label (as Triton emits for every mbarrier
    wait) parse as two loops, and a register they do not name is not reported."""
    wait = ("\t{\n\t.reg .pred complete;\n\twaitLoop:\n"
            "\tmbarrier.try_wait.parity.shared.b64 complete, [%r8], %r7;\n"
            "\t@!complete bra.uni waitLoop;\n\t}\n")
    ptx = _kernel("\twgmma.fence.sync.aligned;\n" + f"\t{_MMA}\n" + "\twgmma.commit_group.sync.aligned;\n"
                  + wait + wait + "\twgmma.wait_group.sync.aligned 0;\n\tld.shared.b32 %r1, [%r8];\n")
    assert wgmma_register_hazards(ptx) == []
    rewrite = ptx.replace("\t}\n", "\tld.shared.b32 %r3, [%r8];\n\t}\n", 1)
    assert len(wgmma_register_hazards(rewrite)) == 1
