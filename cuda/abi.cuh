// The kernel ABI as the Rust side owns it (src/cuda/abi.rs): build.rs writes that file's
// struct layouts and launch constants into aqn_abi.h (in OUT_DIR, on nvcc's include path),
// and each struct or constant the host relies on is checked against it where it is declared:
//
//   AQN_ABI_STRUCT(Args);          sizeof and alignof equal the Rust struct's
//   AQN_ABI_FIELD(Args, rows);     offsetof equals the Rust field's
//   AQN_ABI_CONST(VEC_THREADS);    the constant equals the Rust one
//
// Host and kernels share no compiler, so without these a field added or moved on one side
// only would compile and then hand every kernel garbage arguments.
#pragma once

#include <cstddef>

#include "aqn_abi.h"

#define AQN_ABI_STRUCT(S)                                                               \
    static_assert(sizeof(S) == AQN_ABI_##S##_SIZE,                                      \
                  #S ": size differs from src/cuda/abi.rs");                            \
    static_assert(alignof(S) == AQN_ABI_##S##_ALIGN,                                    \
                  #S ": alignment differs from src/cuda/abi.rs")
#define AQN_ABI_FIELD(S, f)                                                             \
    static_assert(offsetof(S, f) == AQN_ABI_##S##_##f,                                  \
                  #S "::" #f ": offset differs from src/cuda/abi.rs")
#define AQN_ABI_CONST(name)                                                             \
    static_assert(name == AQN_ABI_##name, #name ": value differs from src/cuda/abi.rs")
