// harness.cpp - the kernel translation unit of a host build (see runner.py).
//
// Compiled with
//   -DKERNEL_FILE="\"/abs/path/bn_kernels.cu\""    the unchanged CUDA source
//   -DKERNEL_REGISTRY="\"/abs/path/registry.inc\"" one line per kernel:
//       BN_KERNEL("bn_apply<float, float>", bn_apply<float, float>)
// i.e. the name expression twice: once as the string a launch asks for (the
// same string CuPy's RawModule(name_expressions=...) takes), once as C++
// code. The code part goes through __VA_ARGS__, so the commas of a template
// argument list need no protection.
//
// This translation unit includes no standard header (see cuda_host.h): the
// kernel sees the CUDA subset and nothing else. The runtime is linked in
// from cuda_host.h compiled with -DBNHOST_IMPLEMENTATION.
//
// C interface (modelled on cuLaunchKernel; used through ctypes):
//   int bn_host_launch(name, gx, gy, gz, bx, by, bz, void** args)
//       args[i] points to the value of the i-th kernel parameter (for a
//       pointer parameter: to the pointer). Returns 0; -1 unknown name;
//       -2 a kernel thread misused an intrinsic (message in
//       bn_host_last_error()); -3 invalid launch configuration.
//   const char* bn_host_last_error()
//   int bn_host_kernel_count(), const char* bn_host_kernel_name(int i)
//   const char* bn_host_kernel_signature(name)   e.g. "pc:f32,p:f16,i64,f32"
//   unsigned long long bn_host_shared_bytes()

#include "cuda_host.h"

#ifndef KERNEL_FILE
#error "compile with -DKERNEL_FILE=\"\\\"path/to/kernels.cu\\\"\""
#endif
#ifndef KERNEL_REGISTRY
#error "compile with -DKERNEL_REGISTRY=\"\\\"path/to/registry.inc\\\"\""
#endif

#include KERNEL_FILE

namespace bnhost {

// --- Parameter type codes, so that the Python side can check arguments -----
// "f16" "bf16" "f32" "f64" "b" "i8".."i64" "u8".."u64", "s<bytes>" for anything else
// (structs, vector types); pointers: "p:<pointee>", "pc:<pointee>" when the
// pointee is const, "p:v" for void*.
struct CodeWriter {
    char* out;
    char* end;
    void put(const char* s) {
        while (*s && out + 1 < end) *out++ = *s++;
        *out = 0;
    }
    void put_uint(unsigned long long v) {
        char digits[24];
        int n = 0;
        do digits[n++] = (char)('0' + v % 10); while ((v /= 10) != 0);
        while (n > 0 && out + 1 < end) *out++ = digits[--n];
        *out = 0;
    }
};

template <class T> struct IsSigned { static constexpr bool value = T(-1) < T(0); };

template <class T> struct TypeCode {
    static void write(CodeWriter& w) {
        w.put("s");
        w.put_uint(sizeof(T));
    }
};
template <class T> struct IntCode {
    static void write(CodeWriter& w) {
        w.put(IsSigned<T>::value ? "i" : "u");
        w.put_uint(8 * sizeof(T));
    }
};
template <> struct TypeCode<bool> { static void write(CodeWriter& w) { w.put("b"); } };
template <> struct TypeCode<char> : IntCode<char> {};
template <> struct TypeCode<signed char> : IntCode<signed char> {};
template <> struct TypeCode<unsigned char> : IntCode<unsigned char> {};
template <> struct TypeCode<short> : IntCode<short> {};
template <> struct TypeCode<unsigned short> : IntCode<unsigned short> {};
template <> struct TypeCode<int> : IntCode<int> {};
template <> struct TypeCode<unsigned int> : IntCode<unsigned int> {};
template <> struct TypeCode<long> : IntCode<long> {};
template <> struct TypeCode<unsigned long> : IntCode<unsigned long> {};
template <> struct TypeCode<long long> : IntCode<long long> {};
template <> struct TypeCode<unsigned long long> : IntCode<unsigned long long> {};
template <> struct TypeCode<__half> { static void write(CodeWriter& w) { w.put("f16"); } };
template <> struct TypeCode<__nv_bfloat16> { static void write(CodeWriter& w) { w.put("bf16"); } };
template <> struct TypeCode<float> { static void write(CodeWriter& w) { w.put("f32"); } };
template <> struct TypeCode<double> { static void write(CodeWriter& w) { w.put("f64"); } };
template <> struct TypeCode<void> { static void write(CodeWriter& w) { w.put("v"); } };
template <class T> struct TypeCode<T*> {
    static void write(CodeWriter& w) {
        w.put("p:");
        TypeCode<T>::write(w);
    }
};
template <class T> struct TypeCode<const T*> {
    static void write(CodeWriter& w) {
        w.put("pc:");
        TypeCode<T>::write(w);
    }
};
template <class T> struct TypeCode<T* __restrict__> : TypeCode<T*> {};
template <class T> struct TypeCode<const T* __restrict__> : TypeCode<const T*> {};

// --- Unpacking void** args with the kernel's own parameter types -----------
template <unsigned... I> struct Indices {};
template <unsigned N, unsigned... I> struct MakeIndices : MakeIndices<N - 1, N - 1, I...> {};
template <unsigned... I> struct MakeIndices<0, I...> { using type = Indices<I...>; };

template <auto Kernel> struct KernelEntry;  // Kernel: pointer to a __global__ function
template <class... P, void (*Kernel)(P...)>
struct KernelEntry<Kernel> {
    // Every CUDA thread copies the argument values into its own parameters,
    // as every GPU thread reads its own copy from the parameter space.
    template <unsigned... I>
    static void call(void* const* args, Indices<I...>) {
        Kernel(*static_cast<P*>(args[I])...);
    }
    static void body(void* const* args) {
        call(args, typename MakeIndices<sizeof...(P)>::type{});
    }
    static void signature(char* buf, unsigned long cap) {
        CodeWriter w{buf, buf + cap};
        *buf = 0;
        bool first = true;
        (((first ? (void)(first = false) : w.put(",")), TypeCode<P>::write(w)), ...);
    }
};

struct RegistryEntry {
    const char* name;
    KernelBody body;
    void (*signature)(char*, unsigned long);
};

#define BN_KERNEL(NAME, ...) \
    {NAME, &::bnhost::KernelEntry<&__VA_ARGS__>::body, &::bnhost::KernelEntry<&__VA_ARGS__>::signature},

const RegistryEntry registry[] = {
#include KERNEL_REGISTRY
    {nullptr, nullptr, nullptr}};

#undef BN_KERNEL

constexpr int registry_size = sizeof(registry) / sizeof(registry[0]) - 1;

const RegistryEntry* find(const char* name) {
    for (int i = 0; i < registry_size; ++i) {
        const char* a = registry[i].name;
        const char* b = name;
        while (*a && *a == *b) ++a, ++b;
        if (*a == 0 && *b == 0) return &registry[i];
    }
    return nullptr;
}

char signature_buffer[4096];  // bn_host_kernel_signature's answer

}  // namespace bnhost

extern "C" {

__attribute__((visibility("default"))) int bn_host_launch(const char* name, unsigned gx,
                                                          unsigned gy, unsigned gz, unsigned bx,
                                                          unsigned by, unsigned bz, void** args) {
    const bnhost::RegistryEntry* e = bnhost::find(name);
    if (e == nullptr) {
        bnhost::set_error("unknown kernel name expression (not in this build's registry)");
        return -1;
    }
    return bnhost::launch_grid(e->name, dim3(gx, gy, gz), dim3(bx, by, bz), e->body, args);
}

__attribute__((visibility("default"))) const char* bn_host_last_error() {
    return bnhost::last_error();
}

__attribute__((visibility("default"))) int bn_host_kernel_count() {
    return bnhost::registry_size;
}

__attribute__((visibility("default"))) const char* bn_host_kernel_name(int i) {
    return i >= 0 && i < bnhost::registry_size ? bnhost::registry[i].name : nullptr;
}

// Not thread-safe (one static buffer); the Python side calls it once per
// kernel and caches the answer.
__attribute__((visibility("default"))) const char* bn_host_kernel_signature(const char* name) {
    const bnhost::RegistryEntry* e = bnhost::find(name);
    if (e == nullptr) return nullptr;
    e->signature(bnhost::signature_buffer, sizeof bnhost::signature_buffer);
    return bnhost::signature_buffer;
}

__attribute__((visibility("default"))) unsigned long long bn_host_shared_bytes() {
    return bnhost::shared_bytes();
}

}  // extern "C"
