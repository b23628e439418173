// Hot loops are compiled in AVX-512 / AVX2 / baseline clones picked at load time (GCC function
// multi-versioning), so one binary runs everywhere and uses the wide units where they exist.
// Clones are plain functions (GCC does not clone templates): one definition per type.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MO_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MO_ALWAYS_INLINE inline __attribute__((always_inline))
#define MO_FLATTEN __attribute__((flatten))
#else
#define MO_CPU_CLONES
#define MO_ALWAYS_INLINE inline
#define MO_FLATTEN
#endif
