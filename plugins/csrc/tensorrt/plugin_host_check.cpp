// Host-only check of the TensorRT plugin wrapper, needing TensorRT's public headers but neither a GPU nor the
// TensorRT libraries: the plugin is linked against the CPU reference library (same C API, host pointers), so
// its creator, field (de)serialization, format negotiation, shape checks, workspace bound and the mapping of
// tensor descriptors to TrimodeAttentionParams are exercised for real. Built and run by `make tensorrt-check`.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "block_attention.h"
#include "block_attention_plugin.h"

namespace {

int g_failures = 0;

void expect(bool ok, const char* what) {
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) ++g_failures;
}

using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;

nvinfer1::IPluginV3* create(nvinfer1::IPluginCreatorV3One* creator, int32_t mask, int32_t heads, int32_t kv_heads,
                            int32_t head_dim, float scale) {
    const PluginField fields[] = {PluginField("mask_kind", &mask, PluginFieldType::kINT32, 1),
                                  PluginField("num_heads", &heads, PluginFieldType::kINT32, 1),
                                  PluginField("num_kv_heads", &kv_heads, PluginFieldType::kINT32, 1),
                                  PluginField("head_dim", &head_dim, PluginFieldType::kINT32, 1),
                                  PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1)};
    const PluginFieldCollection fc{5, fields};
    return creator->createPlugin("attn", &fc, nvinfer1::TensorRTPhase::kBUILD);
}

nvinfer1::PluginTensorDesc desc(std::vector<int64_t> dims, DataType type) {
    nvinfer1::PluginTensorDesc d{};
    d.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i) d.dims.d[i] = dims[i];
    d.type = type;
    d.format = nvinfer1::TensorFormat::kLINEAR;
    d.scale = -1.0f;
    return d;
}

}  // namespace

int main() {
    int32_t count = 0;
    nvinfer1::IPluginCreatorInterface* const* creators = getCreators(count);
    expect(count == 1, "getCreators returns one creator");
    auto* creator = static_cast<nvinfer1::IPluginCreatorV3One*>(creators[0]);
    expect(std::strcmp(creator->getPluginName(), "BlockAttention") == 0, "creator name BlockAttention");
    expect(std::strcmp(creator->getPluginNamespace(), "trimode") == 0, "creator namespace trimode");
    expect(std::strcmp(creator->getPluginVersion(), "1") == 0, "creator version 1");
    expect(std::strcmp(creator->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "creator is a V3One creator");
    expect(creator->getFieldNames()->nbFields == 5, "five fields advertised");

    expect(create(creator, 2, 8, 2, 64, 0.125f) == nullptr, "mask_kind 2 (structured) is rejected");
    expect(create(creator, 0, 6, 4, 64, 0.125f) == nullptr, "num_heads not a multiple of num_kv_heads is rejected");
    expect(create(creator, 0, 8, 2, 96, 0.125f) == nullptr, "head_dim 96 is rejected");

    const int B = 2, T = 5, Hq = 8, Hkv = 2, D = 64, L = 40;
    std::unique_ptr<nvinfer1::IPluginV3> plugin(create(creator, 1, Hq, Hkv, D, 0.0f));
    expect(plugin != nullptr, "valid fields create a plugin");
    if (!plugin) return 1;
    auto* core = static_cast<nvinfer1::IPluginV3OneCore*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
    auto* build = static_cast<nvinfer1::IPluginV3OneBuild*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<nvinfer1::IPluginV3OneRuntime*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
    expect(std::strcmp(core->getPluginName(), "BlockAttention") == 0, "core capability names the plugin");
    expect(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0, "build capability");
    expect(std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0, "runtime capability");

    // Serialized fields recreate the same plugin (the runtime phase path); scale defaulted to D ** -0.5.
    const PluginFieldCollection* serialized = runtime->getFieldsToSerialize();
    std::unique_ptr<nvinfer1::IPluginV3> again(creator->createPlugin("attn", serialized, nvinfer1::TensorRTPhase::kRUNTIME));
    const auto& c1 = static_cast<trimode::trt::BlockAttentionPlugin*>(static_cast<nvinfer1::IPluginV3OneCore*>(core))->config();
    expect(again != nullptr, "serialized fields recreate the plugin");
    auto* again_core = static_cast<nvinfer1::IPluginV3OneCore*>(again->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
    const auto& c2 = static_cast<trimode::trt::BlockAttentionPlugin*>(again_core)->config();
    expect(c1.mask_kind == 1 && c2.mask_kind == 1 && c2.num_heads == Hq && c2.num_kv_heads == Hkv && c2.head_dim == D,
           "round-tripped fields");
    expect(std::fabs(c2.scale - 0.125f) < 1e-7f, "scale defaults to head_dim ** -0.5");
    std::unique_ptr<nvinfer1::IPluginV3> cloned(plugin->clone());
    expect(cloned != nullptr && cloned.get() != plugin.get(), "clone");

    // Format negotiation: q decides the float type, the lengths are int32, everything linear.
    std::vector<nvinfer1::DynamicPluginTensorDesc> io(8);
    const DataType types[] = {DataType::kBF16, DataType::kBF16, DataType::kBF16, DataType::kBF16, DataType::kBF16,
                              DataType::kINT32, DataType::kINT32, DataType::kBF16};
    for (int i = 0; i < 8; ++i) io[i].desc = desc({1}, types[i]);
    bool all = true;
    for (int pos = 0; pos < 8; ++pos) all = all && build->supportsFormatCombination(pos, io.data(), 7, 1);
    expect(all, "bf16 + int32 lengths supported");
    io[1].desc.type = DataType::kHALF;
    expect(!build->supportsFormatCombination(1, io.data(), 7, 1), "k_new must follow q's dtype");
    io[5].desc.type = DataType::kINT64;
    expect(!build->supportsFormatCombination(5, io.data(), 7, 1), "int64 lengths rejected");
    io[0].desc.type = DataType::kINT8;
    expect(!build->supportsFormatCombination(0, io.data(), 7, 1), "int8 q rejected");

    // Workspace bound: the max shape's bound covers a smaller one.
    std::vector<nvinfer1::DynamicPluginTensorDesc> dyn(7);
    dyn[0].max = desc({8, 32, Hq * D}, DataType::kBF16).dims;
    dyn[3].max = desc({8, 4096, Hkv * D}, DataType::kBF16).dims;
    const size_t big = build->getWorkspaceSize(dyn.data(), 7, nullptr, 1);
    dyn[0].max = desc({1, 1, Hq * D}, DataType::kBF16).dims;
    dyn[3].max = desc({1, 300, Hkv * D}, DataType::kBF16).dims;
    const size_t small = build->getWorkspaceSize(dyn.data(), 7, nullptr, 1);
    expect(big >= small && small > 0, "workspace bound is monotonic and nonzero for decode");

    // enqueue on host buffers (the CPU library is linked in): the 3-D [B, T, H*D] layout, per-batch caches.
    std::mt19937 gen(0);
    std::normal_distribution<float> normal;
    auto fill = [&](std::vector<float>& v) { for (float& x : v) x = normal(gen); };
    std::vector<float> q(B * T * Hq * D), k(B * T * Hkv * D), v(B * T * Hkv * D), kc(B * L * Hkv * D), vc(B * L * Hkv * D);
    fill(q), fill(k), fill(v), fill(kc), fill(vc);
    const std::vector<float> kc_before = kc;
    std::vector<int32_t> cache_lens = {7, 0}, chunk_lens = {5, 3};
    std::vector<float> out(q.size(), NAN), want(q.size(), NAN);
    const nvinfer1::PluginTensorDesc in_desc[7] = {
        desc({B, T, Hq * D}, DataType::kFLOAT), desc({B, T, Hkv * D}, DataType::kFLOAT),
        desc({B, T, Hkv * D}, DataType::kFLOAT), desc({B, L, Hkv * D}, DataType::kFLOAT),
        desc({B, L, Hkv * D}, DataType::kFLOAT), desc({B}, DataType::kINT32), desc({B}, DataType::kINT32)};
    const nvinfer1::PluginTensorDesc out_desc = desc({B, T, Hq * D}, DataType::kFLOAT);
    const void* inputs[7] = {q.data(), k.data(), v.data(), kc.data(), vc.data(), cache_lens.data(), chunk_lens.data()};
    void* outputs[1] = {out.data()};
    expect(runtime->onShapeChange(in_desc, 7, &out_desc, 1) == 0, "onShapeChange accepts matching shapes");
    expect(runtime->enqueue(in_desc, &out_desc, inputs, outputs, nullptr, nullptr) == 0, "enqueue succeeds");

    TrimodeAttentionParams p{};
    p.abi_version = TRIMODE_ATTENTION_ABI_VERSION;
    p.dtype = TRIMODE_DTYPE_FLOAT32;
    p.batch = B, p.chunk = T, p.num_heads = Hq, p.num_kv_heads = Hkv, p.head_dim = D;
    p.cache_slots = B, p.cache_capacity = L, p.mask_kind = 1, p.write_kv = 0, p.scale = 0.125f;
    p.q = q.data(), p.k_new = k.data(), p.v_new = v.data(), p.k_cache = kc.data(), p.v_cache = vc.data();
    p.slots = nullptr, p.cache_lens = cache_lens.data(), p.chunk_lens = chunk_lens.data(), p.out = want.data();
    expect(trimode_block_attention(&p, nullptr) == 0, "direct C API call succeeds");
    expect(std::memcmp(out.data(), want.data(), out.size() * sizeof(float)) == 0, "plugin output == C API output");
    expect(kc == kc_before, "the plugin never writes the cache");

    const nvinfer1::PluginTensorDesc bad_q = desc({B, T, Hq * D + 1}, DataType::kFLOAT);
    nvinfer1::PluginTensorDesc bad_desc[7];
    std::memcpy(bad_desc, in_desc, sizeof in_desc);
    bad_desc[0] = bad_q;
    expect(runtime->enqueue(bad_desc, &out_desc, inputs, outputs, nullptr, nullptr) != 0, "enqueue rejects wrong head sizes");

    std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "PASSED", g_failures);
    return g_failures ? 1 : 0;
}
