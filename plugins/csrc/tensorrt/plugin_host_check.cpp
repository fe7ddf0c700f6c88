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

// The fields of the ONNX node (num_heads, num_kv_heads, head_dim, scale, plus the string attributes the ONNX
// parser may pass on), and mask_kind only when `mask` is given.
nvinfer1::IPluginV3* create(nvinfer1::IPluginCreatorV3One* creator, const int32_t* mask, int32_t heads,
                            int32_t kv_heads, int32_t head_dim, float scale) {
    static const char kNamespace[] = "trimode";
    static const char kVersion[] = "1";
    std::vector<PluginField> fields = {PluginField("num_heads", &heads, PluginFieldType::kINT32, 1),
                                       PluginField("num_kv_heads", &kv_heads, PluginFieldType::kINT32, 1),
                                       PluginField("head_dim", &head_dim, PluginFieldType::kINT32, 1),
                                       PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1),
                                       PluginField("plugin_namespace", kNamespace, PluginFieldType::kCHAR, 7),
                                       PluginField("plugin_version", kVersion, PluginFieldType::kCHAR, 1)};
    if (mask != nullptr) fields.emplace_back("mask_kind", mask, PluginFieldType::kINT32, 1);
    const PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    return creator->createPlugin("attn", &fc, nvinfer1::TensorRTPhase::kBUILD);
}

nvinfer1::IPluginV3* create(nvinfer1::IPluginCreatorV3One* creator, int32_t mask, int32_t heads, int32_t kv_heads,
                            int32_t head_dim, float scale) {
    return create(creator, &mask, heads, kv_heads, head_dim, scale);
}

const trimode::trt::BlockAttentionConfig& config_of(nvinfer1::IPluginV3* plugin) {
    auto* core = static_cast<nvinfer1::IPluginV3OneCore*>(
        plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
    return static_cast<trimode::trt::BlockAttentionPlugin*>(core)->config();
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
    expect(create(creator, 5, 8, 2, 64, 0.125f) == nullptr, "mask_kind 5 is rejected");
    expect(create(creator, 0, 6, 4, 64, 0.125f) == nullptr, "num_heads not a multiple of num_kv_heads is rejected");
    expect(create(creator, 0, 8, 2, 96, 0.125f) == nullptr, "head_dim 96 is rejected");
    {
        std::unique_ptr<nvinfer1::IPluginV3> fixed(create(creator, 1, 8, 2, 64, 0.125f));
        std::unique_ptr<nvinfer1::IPluginV3> minus_one(create(creator, -1, 8, 2, 64, 0.125f));
        expect(fixed != nullptr && config_of(fixed.get()).mask_kind == 1, "mask_kind 1 fixes the kind");
        expect(minus_one != nullptr && config_of(minus_one.get()).mask_kind == -1, "mask_kind -1: from input 7");
    }

    // The ONNX node's fields: no mask_kind, so the kind comes from input 7 (one plugin for every step kind).
    const int B = 2, T = 5, Hq = 8, Hkv = 2, D = 64, L = 40;
    std::unique_ptr<nvinfer1::IPluginV3> plugin(create(creator, nullptr, Hq, Hkv, D, 0.0f));
    expect(plugin != nullptr, "the ONNX node's fields (no mask_kind) create a plugin");
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
    const auto& c1 = config_of(plugin.get());
    expect(again != nullptr, "serialized fields recreate the plugin");
    if (!again) return 1;
    const auto& c2 = config_of(again.get());
    expect(c1.mask_kind == -1 && c2.mask_kind == -1 && c2.num_heads == Hq && c2.num_kv_heads == Hkv && c2.head_dim == D,
           "round-tripped fields (mask kind still read from the input)");
    expect(std::fabs(c2.scale - 0.125f) < 1e-7f, "scale defaults to head_dim ** -0.5");
    std::unique_ptr<nvinfer1::IPluginV3> cloned(plugin->clone());
    expect(cloned != nullptr && cloned.get() != plugin.get(), "clone");

    // Format negotiation: q decides the float type, the lengths and the mask kind are int32, everything linear.
    std::vector<nvinfer1::DynamicPluginTensorDesc> io(9);
    const DataType types[] = {DataType::kBF16, DataType::kBF16, DataType::kBF16, DataType::kBF16, DataType::kBF16,
                              DataType::kINT32, DataType::kINT32, DataType::kINT32, DataType::kBF16};
    for (int i = 0; i < 9; ++i) io[i].desc = desc({1}, types[i]);
    bool all = true;
    for (int pos = 0; pos < 9; ++pos) all = all && build->supportsFormatCombination(pos, io.data(), 8, 1);
    expect(all, "bf16 + int32 lengths + int32 mask_kind supported");
    expect(!build->supportsFormatCombination(0, io.data(), 7, 1), "7 inputs (no mask_kind) rejected");
    io[7].desc.type = DataType::kINT64;
    expect(!build->supportsFormatCombination(7, io.data(), 8, 1), "int64 mask_kind rejected");
    io[7].desc.type = DataType::kBF16;
    expect(!build->supportsFormatCombination(7, io.data(), 8, 1), "float mask_kind rejected");
    io[7].desc.type = DataType::kINT32;
    io[7].desc.format = nvinfer1::TensorFormat::kCHW32;
    expect(!build->supportsFormatCombination(7, io.data(), 8, 1), "non-linear mask_kind rejected");
    io[1].desc.type = DataType::kHALF;
    expect(!build->supportsFormatCombination(1, io.data(), 8, 1), "k_new must follow q's dtype");
    io[5].desc.type = DataType::kINT64;
    expect(!build->supportsFormatCombination(5, io.data(), 8, 1), "int64 lengths rejected");
    io[0].desc.type = DataType::kINT8;
    expect(!build->supportsFormatCombination(0, io.data(), 8, 1), "int8 q rejected");

    // Output type and shape: those of q.
    DataType out_type = DataType::kINT8;
    const DataType in_types[8] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF,
                                  DataType::kHALF, DataType::kINT32, DataType::kINT32, DataType::kINT32};
    expect(build->getOutputDataTypes(&out_type, 1, in_types, 8) == 0 && out_type == DataType::kHALF,
           "output dtype is q's");
    expect(build->getOutputDataTypes(&out_type, 1, in_types, 7) != 0, "getOutputDataTypes wants 8 inputs");
    {
        // Only the ranks are set (the plugin copies q's expressions and builds none): q 4-D, everything else not.
        struct UnusedExprBuilder : nvinfer1::IExprBuilder {} builder;
        nvinfer1::DimsExprs in_exprs[8] = {};
        in_exprs[0].nbDims = 4;
        for (int i = 1; i < 5; ++i) in_exprs[i].nbDims = 3;
        for (int i = 5; i < 8; ++i) in_exprs[i].nbDims = 1;
        nvinfer1::DimsExprs out_exprs{};
        expect(build->getOutputShapes(in_exprs, 8, nullptr, 0, &out_exprs, 1, builder) == 0 && out_exprs.nbDims == 4,
               "output shape is q's");
        expect(build->getOutputShapes(in_exprs, 7, nullptr, 0, &out_exprs, 1, builder) != 0,
               "getOutputShapes wants 8 inputs");
    }

    // configurePlugin: the export's 4-D tensors, with build-time (-1) batch/chunk/length sizes.
    std::vector<nvinfer1::DynamicPluginTensorDesc> cfg(8);
    cfg[0].desc = desc({-1, -1, Hq, D}, DataType::kFLOAT);
    for (int i : {1, 2}) cfg[i].desc = desc({-1, -1, Hkv, D}, DataType::kFLOAT);
    for (int i : {3, 4}) cfg[i].desc = desc({-1, -1, Hkv, D}, DataType::kFLOAT);
    for (int i : {5, 6}) cfg[i].desc = desc({-1}, DataType::kINT32);
    cfg[7].desc = desc({1}, DataType::kINT32);
    nvinfer1::DynamicPluginTensorDesc cfg_out{};
    cfg_out.desc = desc({-1, -1, Hq, D}, DataType::kFLOAT);
    expect(build->configurePlugin(cfg.data(), 8, &cfg_out, 1) == 0, "configurePlugin accepts the exported node");
    expect(build->configurePlugin(cfg.data(), 7, &cfg_out, 1) != 0, "configurePlugin wants 8 inputs");
    cfg[7].desc = desc({2}, DataType::kINT32);
    expect(build->configurePlugin(cfg.data(), 8, &cfg_out, 1) != 0, "configurePlugin rejects a 2-element mask_kind");

    // Workspace bound: the max shape's bound covers a smaller one.
    std::vector<nvinfer1::DynamicPluginTensorDesc> dyn(8);
    dyn[0].max = desc({8, 32, Hq * D}, DataType::kBF16).dims;
    dyn[3].max = desc({8, 4096, Hkv * D}, DataType::kBF16).dims;
    const size_t big = build->getWorkspaceSize(dyn.data(), 8, nullptr, 1);
    dyn[0].max = desc({1, 1, Hq * D}, DataType::kBF16).dims;
    dyn[3].max = desc({1, 300, Hkv * D}, DataType::kBF16).dims;
    const size_t small = build->getWorkspaceSize(dyn.data(), 8, nullptr, 1);
    expect(big >= small && small > 0, "workspace bound is monotonic and nonzero for decode");

    // enqueue on host buffers (the CPU library is linked in), per-batch caches, in both layouts: the export's
    // [B, T, H, D] and the flat [B, T, H*D]. The SAME plugin object serves a causal then a bidirectional step,
    // the kind being the value of input 7.
    std::mt19937 gen(0);
    std::normal_distribution<float> normal;
    auto fill = [&](std::vector<float>& v) { for (float& x : v) x = normal(gen); };
    std::vector<float> q(B * T * Hq * D), k(B * T * Hkv * D), v(B * T * Hkv * D), kc(B * L * Hkv * D), vc(B * L * Hkv * D);
    fill(q), fill(k), fill(v), fill(kc), fill(vc);
    const std::vector<float> kc_before = kc, vc_before = vc;
    std::vector<int32_t> cache_lens = {7, 0}, chunk_lens = {5, 3};
    int32_t mask_input[1] = {0};

    TrimodeAttentionParams p{};
    p.abi_version = TRIMODE_ATTENTION_ABI_VERSION;
    p.dtype = TRIMODE_DTYPE_FLOAT32;
    p.batch = B, p.chunk = T, p.num_heads = Hq, p.num_kv_heads = Hkv, p.head_dim = D;
    p.cache_slots = B, p.cache_capacity = L, p.write_kv = 0, p.scale = 0.125f;
    p.q = q.data(), p.k_new = k.data(), p.v_new = v.data(), p.k_cache = kc.data(), p.v_cache = vc.data();
    p.slots = nullptr, p.cache_lens = cache_lens.data(), p.chunk_lens = chunk_lens.data();
    std::vector<float> want[2] = {std::vector<float>(q.size(), NAN), std::vector<float>(q.size(), NAN)};
    for (int mask : {0, 1}) {
        p.mask_kind = mask, p.mask_kind_device = nullptr, p.out = want[mask].data();
        expect(trimode_block_attention(&p, nullptr) == 0, mask ? "direct C API call (bidirectional) succeeds"
                                                               : "direct C API call (causal) succeeds");
    }
    expect(std::memcmp(want[0].data(), want[1].data(), q.size() * sizeof(float)) != 0,
           "causal and bidirectional results differ (the check can tell them apart)");

    const void* inputs[8] = {q.data(),  k.data(),          v.data(),          kc.data(),
                             vc.data(), cache_lens.data(), chunk_lens.data(), mask_input};
    for (const bool flat : {false, true}) {
        const std::vector<int64_t> q_dims = flat ? std::vector<int64_t>{B, T, Hq * D} : std::vector<int64_t>{B, T, Hq, D};
        const std::vector<int64_t> kv_dims = flat ? std::vector<int64_t>{B, T, Hkv * D} : std::vector<int64_t>{B, T, Hkv, D};
        const std::vector<int64_t> cache_dims = flat ? std::vector<int64_t>{B, L, Hkv * D} : std::vector<int64_t>{B, L, Hkv, D};
        const nvinfer1::PluginTensorDesc in_desc[8] = {
            desc(q_dims, DataType::kFLOAT),     desc(kv_dims, DataType::kFLOAT),    desc(kv_dims, DataType::kFLOAT),
            desc(cache_dims, DataType::kFLOAT), desc(cache_dims, DataType::kFLOAT), desc({B}, DataType::kINT32),
            desc({B}, DataType::kINT32),        desc({1}, DataType::kINT32)};
        const nvinfer1::PluginTensorDesc out_desc = desc(q_dims, DataType::kFLOAT);
        const char* layout = flat ? "[B, T, H*D]" : "[B, T, H, D]";
        std::printf("-- layout %s\n", layout);
        expect(runtime->onShapeChange(in_desc, 8, &out_desc, 1) == 0, "onShapeChange accepts matching shapes");
        for (const int mask : {0, 1, 0}) {  // causal, bidirectional, and back: one plugin object throughout
            std::vector<float> out(q.size(), NAN);
            void* outputs[1] = {out.data()};
            mask_input[0] = mask;
            expect(runtime->enqueue(in_desc, &out_desc, inputs, outputs, nullptr, nullptr) == 0, "enqueue succeeds");
            expect(std::memcmp(out.data(), want[mask].data(), out.size() * sizeof(float)) == 0,
                   mask ? "input mask_kind 1: plugin output == bidirectional C API output"
                        : "input mask_kind 0: plugin output == causal C API output");
        }

        // An invalid kind in the tensor: the CPU library rejects it (the CUDA kernel would write zeros instead).
        std::vector<float> out(q.size(), NAN);
        void* outputs[1] = {out.data()};
        mask_input[0] = 7;
        expect(runtime->enqueue(in_desc, &out_desc, inputs, outputs, nullptr, nullptr) == TRIMODE_ERR_MASK_KIND,
               "input mask_kind 7 is reported (CPU library: status 5)");
        mask_input[0] = 0;

        // A fixed mask_kind field wins over the input.
        std::unique_ptr<nvinfer1::IPluginV3> fixed(create(creator, 1, Hq, Hkv, D, 0.0f));
        auto* fixed_runtime = static_cast<nvinfer1::IPluginV3OneRuntime*>(
            fixed->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
        expect(fixed_runtime->enqueue(in_desc, &out_desc, inputs, outputs, nullptr, nullptr) == 0 &&
                   std::memcmp(out.data(), want[1].data(), out.size() * sizeof(float)) == 0,
               "mask_kind field 1 ignores input value 0");

        nvinfer1::PluginTensorDesc bad_desc[8];
        std::memcpy(bad_desc, in_desc, sizeof in_desc);
        bad_desc[0] = desc(flat ? std::vector<int64_t>{B, T, Hq * D + 1} : std::vector<int64_t>{B, T, Hq + 1, D},
                           DataType::kFLOAT);
        expect(runtime->enqueue(bad_desc, &out_desc, inputs, outputs, nullptr, nullptr) != 0,
               "enqueue rejects wrong head sizes");
        std::memcpy(bad_desc, in_desc, sizeof in_desc);
        bad_desc[7] = desc({2}, DataType::kINT32);
        expect(runtime->onShapeChange(bad_desc, 8, &out_desc, 1) != 0, "onShapeChange rejects a 2-element mask_kind");
        std::memcpy(bad_desc, in_desc, sizeof in_desc);
        bad_desc[3] = desc(flat ? std::vector<int64_t>{B + 1, L, Hkv * D} : std::vector<int64_t>{B + 1, L, Hkv, D},
                           DataType::kFLOAT);
        bad_desc[4] = bad_desc[3];
        expect(runtime->onShapeChange(bad_desc, 8, &out_desc, 1) != 0, "onShapeChange rejects caches with B' != B");
        expect(runtime->onShapeChange(in_desc, 7, &out_desc, 1) != 0, "onShapeChange wants 8 inputs");
    }
    expect(kc == kc_before && vc == vc_before, "the plugin never writes the cache");

    std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "PASSED", g_failures);
    return g_failures ? 1 : 0;
}
