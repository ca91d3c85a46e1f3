"""``bnkernels/sass_loops.py``: innermost loops with global loads and their
instructions per byte, on SASS text of the form ``cuobjdump -sass`` prints
(the real kernels' SASS is read in ``test_kernel_report.py``)."""
from bnkernels import sass_loops as sl

SASS = """
        Function : _Z4demoPKfPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, R3, PT ;
        /*0020*/              @P0 EXIT ;
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   FADD R8, R4, R5 ;
        /*0050*/                   LDG.E.U16 R9, desc[UR4][R6.64] ;
        /*0060*/                   IADD3 R0, R0, 0x100, RZ ;
        /*0070*/                   ISETP.GE.AND P0, PT, R0, R3, PT ;
        /*0080*/              @!P0 BRA 0x30 ;
        /*0090*/                   LDG.E R10, desc[UR4][R2.64] ;
        /*00a0*/                   MOV R11, R10 ;
        /*00b0*/                   BRA 0x90 ;
        /*00c0*/                   STG.E [R2.64], R8 ;
        /*00d0*/                   BRA 0xd0 ;
        Function : _Z5outerv
        /*0000*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0010*/                   FADD R4, R4, R4 ;
        /*0020*/              @P1 BRA 0x10 ;
        /*0030*/              @P0 BRA 0x0 ;
"""


def test_innermost_loops_with_global_loads():
    fns = sl.functions(SASS)
    assert set(fns) == {"_Z4demoPKfPf", "_Z5outerv"}
    loops = sl.hot_loops(fns["_Z4demoPKfPf"])
    # 0x30..0x80: 6 instructions, a 16-byte and a 2-byte load; 0x90..0xb0: 3 and 4 bytes;
    # the self-loop at 0xd0 (the trap after EXIT) loads nothing
    assert [(hex(lp.start), hex(lp.end), lp.instructions, lp.load_bytes) for lp in loops] == [
        ("0x30", "0x80", 6, 18), ("0x90", "0xb0", 3, 4)]
    assert sl.worst(loops).per_byte == 3 / 4
    assert loops[0].to_dict()["loads_by_bits"] == {"16": 1, "128": 1}


def test_an_outer_loop_is_not_innermost():
    loops = sl.hot_loops(sl.functions(SASS)["_Z5outerv"])
    assert loops == []  # the inner loop 0x10..0x20 loads nothing; 0x0..0x30 contains it


def test_function_texts_split_the_listing():
    texts = sl.function_texts(SASS)
    assert texts["_Z5outerv"].count("BRA") == 2 and "_Z4demo" not in texts["_Z5outerv"]


def test_no_loop_no_hot_loop():
    assert sl.worst([]) is None
