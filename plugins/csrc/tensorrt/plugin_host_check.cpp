// Host-only check of the TensorRT plugin wrapper, needing TensorRT's public headers but neither a GPU nor the
// TensorRT libraries: the plugin is linked against the CPU reference library (same C API, host pointers), so
// its creator, field (de)serialization, format negotiation, shape checks, workspace bound and the mapping of
// the 10 inputs (ABI 4: a page pool [P, S, Hkv, D] and a page table [B, T]) to TrimodeAttentionParams are
// exercised for real. Built and run by `make tensorrt-check`.
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

constexpr int kInputs = 10;

// The fields of the ONNX node (num_heads, num_kv_heads, head_dim, scale, plus the string attributes the ONNX
// parser may pass on), and max_chunk only when given (> 0).
nvinfer1::IPluginV3* create(nvinfer1::IPluginCreatorV3One* creator, int32_t heads, int32_t kv_heads,
                            int32_t head_dim, float scale, int32_t max_chunk = 0) {
    static const char kNamespace[] = "trimode";
    static const char kVersion[] = "1";
    std::vector<PluginField> fields = {PluginField("num_heads", &heads, PluginFieldType::kINT32, 1),
                                       PluginField("num_kv_heads", &kv_heads, PluginFieldType::kINT32, 1),
                                       PluginField("head_dim", &head_dim, PluginFieldType::kINT32, 1),
                                       PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1),
                                       PluginField("plugin_namespace", kNamespace, PluginFieldType::kCHAR, 7),
                                       PluginField("plugin_version", kVersion, PluginFieldType::kCHAR, 1)};
    if (max_chunk != 0) fields.emplace_back("max_chunk", &max_chunk, PluginFieldType::kINT32, 1);
    const PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    return creator->createPlugin("attn", &fc, nvinfer1::TensorRTPhase::kBUILD);
}

const trimode::trt::BlockAttentionConfig& config_of(nvinfer1::IPluginV3* plugin) {
    auto* core = static_cast<nvinfer1::IPluginV3OneCore*>(
        plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
    return static_cast<trimode::trt::BlockAttentionPlugin*>(core)->config();
}

nvinfer1::IPluginV3OneRuntime* runtime_of(nvinfer1::IPluginV3* plugin) {
    return static_cast<nvinfer1::IPluginV3OneRuntime*>(
        plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
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
    expect(creator->getFieldNames()->nbFields == 6, "six fields advertised");

    expect(create(creator, 6, 4, 64, 0.125f) == nullptr, "num_heads not a multiple of num_kv_heads is rejected");
    expect(create(creator, 8, 2, 96, 0.125f) == nullptr, "head_dim 96 is rejected");
    expect(create(creator, 8, 2, 64, 0.125f, -3) == nullptr, "a negative max_chunk is rejected");

    const int Hq = 8, Hkv = 2, D = 64, P = 24, S = 8, T = 6;  // a pool of 24 pages of 8; tables of 6 entries
    std::unique_ptr<nvinfer1::IPluginV3> plugin(create(creator, Hq, Hkv, D, 0.0f));
    expect(plugin != nullptr, "the ONNX node's fields create a plugin");
    if (!plugin) return 1;
    auto* core = static_cast<nvinfer1::IPluginV3OneCore*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
    auto* build = static_cast<nvinfer1::IPluginV3OneBuild*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
    auto* runtime = runtime_of(plugin.get());
    expect(std::strcmp(core->getPluginName(), "BlockAttention") == 0, "core capability names the plugin");
    expect(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0, "build capability");
    expect(std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0, "runtime capability");

    // Serialized fields recreate the same plugin (the runtime phase path); scale defaulted to D ** -0.5.
    {
        std::unique_ptr<nvinfer1::IPluginV3> bounded(create(creator, Hq, Hkv, D, 0.0f, 12));
        std::unique_ptr<nvinfer1::IPluginV3> again(
            creator->createPlugin("attn", runtime_of(bounded.get())->getFieldsToSerialize(), nvinfer1::TensorRTPhase::kRUNTIME));
        expect(again != nullptr, "serialized fields recreate the plugin");
        if (!again) return 1;
        const auto& c = config_of(again.get());
        expect(c.num_heads == Hq && c.num_kv_heads == Hkv && c.head_dim == D && c.max_chunk == 12 && c.max_cache_len == 0,
               "round-tripped fields (max_chunk kept)");
        expect(std::fabs(c.scale - 0.125f) < 1e-7f, "scale defaults to head_dim ** -0.5");
    }
    std::unique_ptr<nvinfer1::IPluginV3> cloned(plugin->clone());
    expect(cloned != nullptr && cloned.get() != plugin.get(), "clone");

    // Format negotiation: q decides the float type, the five row arrays are int32, everything linear.
    std::vector<nvinfer1::DynamicPluginTensorDesc> io(kInputs + 1);
    for (int i = 0; i <= kInputs; ++i) io[i].desc = desc({1}, i >= 5 && i < kInputs ? DataType::kINT32 : DataType::kBF16);
    bool all = true;
    for (int pos = 0; pos <= kInputs; ++pos) all = all && build->supportsFormatCombination(pos, io.data(), kInputs, 1);
    expect(all, "bf16 tensors + int32 row arrays supported");
    expect(!build->supportsFormatCombination(0, io.data(), 9, 1), "9 inputs rejected");
    for (int pos = 5; pos < kInputs; ++pos) {
        io[pos].desc.type = DataType::kINT64;
        all = all && !build->supportsFormatCombination(pos, io.data(), kInputs, 1);
        io[pos].desc.type = DataType::kINT32;
    }
    expect(all, "int64 row arrays rejected");
    io[8].desc.format = nvinfer1::TensorFormat::kCHW32;
    expect(!build->supportsFormatCombination(8, io.data(), kInputs, 1), "non-linear mask_kind rejected");
    io[8].desc.format = nvinfer1::TensorFormat::kLINEAR;
    io[1].desc.type = DataType::kHALF;
    expect(!build->supportsFormatCombination(1, io.data(), kInputs, 1), "k_new must follow q's dtype");
    io[0].desc.type = DataType::kINT8;
    expect(!build->supportsFormatCombination(0, io.data(), kInputs, 1), "int8 q rejected");

    // Output type and shape: those of q.
    DataType out_type = DataType::kINT8;
    DataType in_types[kInputs];
    for (int i = 0; i < kInputs; ++i) in_types[i] = i < 5 ? DataType::kHALF : DataType::kINT32;
    expect(build->getOutputDataTypes(&out_type, 1, in_types, kInputs) == 0 && out_type == DataType::kHALF,
           "output dtype is q's");
    expect(build->getOutputDataTypes(&out_type, 1, in_types, 9) != 0, "getOutputDataTypes wants 10 inputs");
    {
        struct UnusedExprBuilder : nvinfer1::IExprBuilder {} builder;
        nvinfer1::DimsExprs in_exprs[kInputs] = {};
        in_exprs[0].nbDims = 3;
        for (int i = 1; i < 5; ++i) in_exprs[i].nbDims = i < 3 ? 3 : 4;
        for (int i = 5; i < kInputs; ++i) in_exprs[i].nbDims = i == 6 ? 2 : 1;
        nvinfer1::DimsExprs out_exprs{};
        expect(build->getOutputShapes(in_exprs, kInputs, nullptr, 0, &out_exprs, 1, builder) == 0 && out_exprs.nbDims == 3,
               "output shape is q's");
        expect(build->getOutputShapes(in_exprs, 9, nullptr, 0, &out_exprs, 1, builder) != 0,
               "getOutputShapes wants 10 inputs");
    }

    // configurePlugin: the export's tensors with build-time (-1) token and row counts.
    std::vector<nvinfer1::DynamicPluginTensorDesc> cfg(kInputs);
    cfg[0].desc = desc({-1, Hq, D}, DataType::kFLOAT);
    for (int i : {1, 2}) cfg[i].desc = desc({-1, Hkv, D}, DataType::kFLOAT);
    for (int i : {3, 4}) cfg[i].desc = desc({P, S, Hkv, D}, DataType::kFLOAT);
    for (int i = 5; i < kInputs; ++i) cfg[i].desc = desc(i == 6 ? std::vector<int64_t>{-1, -1} : std::vector<int64_t>{-1},
                                                         DataType::kINT32);
    nvinfer1::DynamicPluginTensorDesc cfg_out{};
    cfg_out.desc = desc({-1, Hq, D}, DataType::kFLOAT);
    expect(build->configurePlugin(cfg.data(), kInputs, &cfg_out, 1) == 0, "configurePlugin accepts the exported node");
    expect(build->configurePlugin(cfg.data(), 9, &cfg_out, 1) != 0, "configurePlugin wants 10 inputs");
    cfg[8].desc = desc({-1, 1}, DataType::kINT32);
    expect(build->configurePlugin(cfg.data(), kInputs, &cfg_out, 1) != 0, "configurePlugin rejects a 2-D mask_kind");
    cfg[8].desc = desc({-1}, DataType::kINT32);
    cfg[6].desc = desc({-1}, DataType::kINT32);
    expect(build->configurePlugin(cfg.data(), kInputs, &cfg_out, 1) != 0, "configurePlugin rejects a 1-D page_table");
    cfg[6].desc = desc({-1, -1}, DataType::kINT32);
    cfg[3].desc = desc({P, S, Hkv * D}, DataType::kFLOAT);
    expect(build->configurePlugin(cfg.data(), kInputs, &cfg_out, 1) != 0,
           "configurePlugin rejects a flat cache with 3-D k_new");

    // Workspace bound: the max shape's bound covers a smaller one; a max_chunk field lowers it.
    std::vector<nvinfer1::DynamicPluginTensorDesc> dyn(kInputs);
    dyn[0].max = desc({256, Hq * D}, DataType::kBF16).dims;
    dyn[3].max = desc({4096, 16, Hkv * D}, DataType::kBF16).dims;
    dyn[6].max = desc({8, 256}, DataType::kINT32).dims;  // T * S = 4096 positions per row
    const size_t big = build->getWorkspaceSize(dyn.data(), kInputs, nullptr, 1);
    dyn[0].max = desc({1, Hq * D}, DataType::kBF16).dims;
    dyn[6].max = desc({1, 19}, DataType::kINT32).dims;  // 304 positions
    const size_t small = build->getWorkspaceSize(dyn.data(), kInputs, nullptr, 1);
    dyn[6].max = desc({1, 1}, DataType::kINT32).dims;  // 16 positions: a single key tile, no split
    const size_t tiny = build->getWorkspaceSize(dyn.data(), kInputs, nullptr, 1);
    expect(big >= small && small > 0, "workspace bound is monotonic and nonzero for decode");
    expect(tiny == 0, "workspace bound follows T * S (one key tile: no split, no workspace)");

    // enqueue on host buffers (the CPU library is linked in), in both layouts, rows of all four kinds over
    // shuffled page tables (two rows sharing read-only pages; unused entries hold garbage). The SAME plugin object
    // serves two different mixes of rows (only the row arrays' and page table's values change), each equal to the
    // direct C API call with write = NULL; the caches are never written.
    std::mt19937 gen(0);
    std::normal_distribution<float> normal;
    auto fill = [&](std::vector<float>& v) { for (float& x : v) x = normal(gen); };
    const int N = 5 + 6 + 4 + 7 + 3;  // tokens of the first mix (+3 owned by no row)
    const int B = 4;
    std::vector<float> q(N * Hq * D), k(N * Hkv * D), v(N * Hkv * D), kc(P * S * Hkv * D), vc(P * S * Hkv * D);
    fill(q), fill(k), fill(v), fill(kc), fill(vc);
    const std::vector<float> kc_before = kc, vc_before = vc;
    struct Mix {
        std::vector<int32_t> cu, table, lens, kinds, params;  // table: [B, T] row-major
    };
    const Mix mixes[2] = {
        // causal quad bidir prefix; rows 2 and 3 share pages 3 and 11
        {{0, 5, 11, 15, 22},
         {17, -1, 99, -1, -1, -1, /**/ -1, 5, 5, 5, 5, 5, /**/ 3, 11, 20, 8, 14, 77, /**/ 3, 11, 0, 0, 0, 0},
         {7, 0, 33, 12}, {0, 2, 1, 3}, {0, 2, 0, 3}},
        // quad causal bidir prefix; rows 1 and 3 share page 22
        {{0, 12, 14, 15, 20},
         {-5, 0, 0, 0, 0, 0, /**/ 22, 1, -1, -1, -1, -1, /**/ 9, 2, 23, 4, 6, 99, /**/ 22, 1000, 7, 7, 7, 7},
         {0, 9, 39, 4}, {2, 0, 1, 3}, {3, 0, 0, 5}},
    };
    std::vector<int32_t> cu(B + 1), table(B * T), lens(B), kinds(B), params(B);
    auto load_mix = [&](const Mix& m) { cu = m.cu, table = m.table, lens = m.lens, kinds = m.kinds, params = m.params; };

    TrimodeAttentionParams p{};
    p.abi_version = TRIMODE_ATTENTION_ABI_VERSION;
    p.dtype = TRIMODE_DTYPE_FLOAT32;
    p.num_rows = B, p.num_tokens = N, p.num_heads = Hq, p.num_kv_heads = Hkv, p.head_dim = D;
    p.num_pages = P, p.page_size = S, p.pages_per_row = T, p.max_chunk = N, p.scale = 0.125f;
    p.q = q.data(), p.k_new = k.data(), p.v_new = v.data(), p.k_cache = kc.data(), p.v_cache = vc.data();
    p.write = nullptr;
    std::vector<float> want[2] = {std::vector<float>(q.size(), NAN), std::vector<float>(q.size(), NAN)};
    for (int m = 0; m < 2; ++m) {
        load_mix(mixes[m]);
        p.cu_seqlens = cu.data(), p.page_table = table.data(), p.cache_lens = lens.data(), p.mask_kind = kinds.data();
        p.mask_param = params.data(), p.out = want[m].data();
        expect(trimode_block_attention(&p, nullptr) == 0, "direct C API call succeeds");
    }
    expect(std::memcmp(want[0].data(), want[1].data(), q.size() * sizeof(float)) != 0,
           "the two mixes give different results (the check can tell them apart)");

    const void* inputs[kInputs] = {q.data(),  k.data(),     v.data(),    kc.data(),    vc.data(),
                                   cu.data(), table.data(), lens.data(), kinds.data(), params.data()};
    for (const bool flat : {false, true}) {
        const std::vector<int64_t> q_dims = flat ? std::vector<int64_t>{N, Hq * D} : std::vector<int64_t>{N, Hq, D};
        const std::vector<int64_t> kv_dims = flat ? std::vector<int64_t>{N, Hkv * D} : std::vector<int64_t>{N, Hkv, D};
        const std::vector<int64_t> cache_dims = flat ? std::vector<int64_t>{P, S, Hkv * D} : std::vector<int64_t>{P, S, Hkv, D};
        nvinfer1::PluginTensorDesc in_desc[kInputs] = {
            desc(q_dims, DataType::kFLOAT),     desc(kv_dims, DataType::kFLOAT),    desc(kv_dims, DataType::kFLOAT),
            desc(cache_dims, DataType::kFLOAT), desc(cache_dims, DataType::kFLOAT), desc({B + 1}, DataType::kINT32),
            desc({B, T}, DataType::kINT32),     desc({B}, DataType::kINT32),        desc({B}, DataType::kINT32),
            desc({B}, DataType::kINT32)};
        const nvinfer1::PluginTensorDesc out_desc = desc(q_dims, DataType::kFLOAT);
        std::printf("-- layout %s\n", flat ? "[N, H*D]" : "[N, H, D]");
        expect(runtime->onShapeChange(in_desc, kInputs, &out_desc, 1) == 0, "onShapeChange accepts matching shapes");
        for (const int m : {0, 1, 0}) {  // one plugin object throughout
            load_mix(mixes[m]);
            std::vector<float> out(q.size(), NAN);
            void* outputs[1] = {out.data()};
            expect(runtime->enqueue(in_desc, &out_desc, inputs, outputs, nullptr, nullptr) == 0, "enqueue succeeds");
            expect(std::memcmp(out.data(), want[m].data(), out.size() * sizeof(float)) == 0,
                   m ? "mix 2: plugin output == C API output" : "mix 1: plugin output == C API output");
        }

        // A max_chunk field that bounds every row gives the same result; one that does not is reported (the
        // CUDA kernel would zero the longer rows).
        load_mix(mixes[0]);
        std::vector<float> out(q.size(), NAN);
        void* outputs[1] = {out.data()};
        std::unique_ptr<nvinfer1::IPluginV3> bounded(create(creator, Hq, Hkv, D, 0.0f, 7));
        expect(runtime_of(bounded.get())->enqueue(in_desc, &out_desc, inputs, outputs, nullptr, nullptr) == 0 &&
                   std::memcmp(out.data(), want[0].data(), out.size() * sizeof(float)) == 0,
               "max_chunk 7 (the longest row): same output");
        std::unique_ptr<nvinfer1::IPluginV3> short_bound(create(creator, Hq, Hkv, D, 0.0f, 6));
        expect(runtime_of(short_bound.get())->enqueue(in_desc, &out_desc, inputs, outputs, nullptr, nullptr) ==
                   TRIMODE_ERR_OUT_OF_RANGE,
               "max_chunk 6 below a 7-token row is reported (CPU library: status 9)");

        // An invalid row in the tensors: the CPU library rejects it (the CUDA kernel would zero that row).
        kinds[1] = 2, params[1] = 3;  // quad L = 3 needs 12 tokens, the row has 6
        expect(runtime->enqueue(in_desc, &out_desc, inputs, outputs, nullptr, nullptr) == TRIMODE_ERR_INVALID_ROW,
               "a quad row of the wrong length is reported (CPU library: status 6)");
        kinds[1] = 9;
        expect(runtime->enqueue(in_desc, &out_desc, inputs, outputs, nullptr, nullptr) == TRIMODE_ERR_MASK_KIND,
               "an unknown kind is reported (CPU library: status 5)");
        load_mix(mixes[0]);
        table[2 * T + 4] = P;  // row 2 (p_b = 33) reads entry 4: a page past the pool
        expect(runtime->enqueue(in_desc, &out_desc, inputs, outputs, nullptr, nullptr) == TRIMODE_ERR_OUT_OF_RANGE,
               "a page id outside the pool is reported (CPU library: status 9)");
        load_mix(mixes[0]);

        nvinfer1::PluginTensorDesc bad_desc[kInputs];
        std::memcpy(bad_desc, in_desc, sizeof in_desc);
        bad_desc[0] = desc(flat ? std::vector<int64_t>{N, Hq * D + 1} : std::vector<int64_t>{N, Hq + 1, D},
                           DataType::kFLOAT);
        expect(runtime->enqueue(bad_desc, &out_desc, inputs, outputs, nullptr, nullptr) != 0,
               "enqueue rejects wrong head sizes");
        std::memcpy(bad_desc, in_desc, sizeof in_desc);
        bad_desc[5] = desc({B}, DataType::kINT32);
        expect(runtime->onShapeChange(bad_desc, kInputs, &out_desc, 1) != 0, "onShapeChange rejects cu_seqlens != [B+1]");
        std::memcpy(bad_desc, in_desc, sizeof in_desc);
        bad_desc[9] = desc({B - 1}, DataType::kINT32);
        expect(runtime->onShapeChange(bad_desc, kInputs, &out_desc, 1) != 0, "onShapeChange rejects mask_param != [B]");
        std::memcpy(bad_desc, in_desc, sizeof in_desc);
        bad_desc[6] = desc({B * T}, DataType::kINT32);
        expect(runtime->onShapeChange(bad_desc, kInputs, &out_desc, 1) != 0, "onShapeChange rejects a 1-D page_table");
        bad_desc[6] = desc({B - 1, T}, DataType::kINT32);
        expect(runtime->onShapeChange(bad_desc, kInputs, &out_desc, 1) != 0, "onShapeChange rejects page_table [B-1, T]");
        bad_desc[6] = desc({B, 0}, DataType::kINT32);
        expect(runtime->onShapeChange(bad_desc, kInputs, &out_desc, 1) != 0, "onShapeChange rejects T = 0");
        expect(runtime->enqueue(bad_desc, &out_desc, inputs, outputs, nullptr, nullptr) != 0, "enqueue rejects T = 0");
        std::memcpy(bad_desc, in_desc, sizeof in_desc);
        bad_desc[1] = desc(flat ? std::vector<int64_t>{N - 1, Hkv * D} : std::vector<int64_t>{N - 1, Hkv, D}, DataType::kFLOAT);
        bad_desc[2] = bad_desc[1];
        expect(runtime->onShapeChange(bad_desc, kInputs, &out_desc, 1) != 0, "onShapeChange rejects k_new with N' != N");
        expect(runtime->onShapeChange(in_desc, 9, &out_desc, 1) != 0, "onShapeChange wants 10 inputs");
    }
    expect(kc == kc_before && vc == vc_before, "the plugin never writes the cache");

    std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "PASSED", g_failures);
    return g_failures ? 1 : 0;
}
