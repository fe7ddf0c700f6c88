// Bit-exact fp32 <-> bf16/fp16 conversions (round to nearest even) for host code: the CPU reference library and
// the CPU emulation of the CUDA kernel, neither of which may depend on the CUDA headers.
#ifndef TRIMODE_FLOAT16_CONVERT_H
#define TRIMODE_FLOAT16_CONVERT_H

#include <cstdint>
#include <cstring>

namespace trimode {

// bf16 is the upper half of an fp32; rounding to nearest even, NaN kept quiet.
inline float bf16_to_float(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

inline float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal half: normalize
            int e = -1;
            do {
                ++e;
                mant <<= 1;
            } while ((mant & 0x400u) == 0);
            bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t float_to_half(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
    const uint32_t abs = bits & 0x7fffffffu;
    if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
    if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: infinity
    if (abs < 0x33000001u) return sign;             // below half the smallest subnormal
    const int exp = static_cast<int>(abs >> 23) - 127;
    if (exp < -14) {  // subnormal half: shift the implicit-one mantissa, round to nearest even
        const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
        const int shift = -exp - 14 + 13;
        uint32_t out = mant >> shift;
        const uint32_t rest = mant & ((1u << shift) - 1u);
        const uint32_t half = 1u << (shift - 1);
        if (rest > half || (rest == half && (out & 1u))) ++out;
        return sign | static_cast<uint16_t>(out);
    }
    uint32_t out = ((static_cast<uint32_t>(exp + 15)) << 10) | ((abs >> 13) & 0x3ffu);
    const uint32_t rest = abs & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (out & 1u))) ++out;  // may carry into the exponent: correct
    return sign | static_cast<uint16_t>(out);
}

}  // namespace trimode

#endif  // TRIMODE_FLOAT16_CONVERT_H
