// TensorRT IPluginV3 wrapper of trimode_block_attention (see block_attention_plugin.h for the I/O contract).
// The plugin holds no device state: every enqueue builds TrimodeAttentionParams from the tensor descriptors and
// calls the C API on TensorRT's stream, with TensorRT's workspace for the flash-decoding partial results.
#include "block_attention_plugin.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "block_attention.h"
#include "block_attention_common.h"

namespace trimode {
namespace trt {
namespace {

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;
using nvinfer1::TensorFormat;

constexpr int32_t kNbInputs = 10;
enum Input { kQ = 0, kKNew, kVNew, kKCache, kVCache, kCuSeqlens, kPageTable, kCacheLens, kMaskKind, kMaskParam };
constexpr const char* kInputList =
    "q, k_new, v_new, k_cache, v_cache, cu_seqlens, page_table, cache_lens, mask_kind, mask_param";

// Workspace TensorRT is asked for at most: bigger shapes simply get fewer splits (the kernel fits the split
// count to the workspace it is given), never a wrong result.
constexpr size_t kWorkspaceCap = size_t(64) << 20;

nvinfer1::ILoggerFinder* g_logger_finder = nullptr;

void log_error(const std::string& message) {
    if (g_logger_finder == nullptr) return;
    nvinfer1::ILogger* logger = g_logger_finder->findLogger();
    if (logger != nullptr) logger->log(nvinfer1::ILogger::Severity::kERROR, ("trimode::BlockAttention: " + message).c_str());
}

int32_t dtype_code(DataType type) {
    switch (type) {
        case DataType::kFLOAT: return TRIMODE_DTYPE_FLOAT32;
        case DataType::kHALF: return TRIMODE_DTYPE_FLOAT16;
        case DataType::kBF16: return TRIMODE_DTYPE_BFLOAT16;
        default: return -1;
    }
}

// The max_chunk the kernel is given for N packed tokens: the field, clamped to [1, N], or N without one.
int64_t max_chunk_for(int64_t tokens, const BlockAttentionConfig& c) {
    if (tokens <= 0) return 0;
    return c.max_chunk > 0 && c.max_chunk < tokens ? c.max_chunk : tokens;
}

// The max_cache_len the kernel is given when a page table addresses `capacity` = T * S positions: the field, or
// 0 (= T * S) when absent or above it.
int32_t max_cache_len_for(int64_t capacity, const BlockAttentionConfig& c) {
    return c.max_cache_len > 0 && c.max_cache_len < capacity ? c.max_cache_len : 0;
}

// Upper bound of the workspace the kernel can use for these sizes (capacity: T * S), device independent and
// monotonic in every size, so the bound at the profile's max shape covers every shape the engine runs: the
// enqueue passes the bound of the actual shape, which never exceeds what TensorRT allocated.
size_t workspace_bound(int64_t tokens, int64_t capacity, const BlockAttentionConfig& c) {
    if (tokens <= 0 || capacity < 0) return 0;
    const int64_t cache = c.max_cache_len > 0 && c.max_cache_len < capacity ? c.max_cache_len : capacity;
    const int64_t key_tiles = (cache + max_chunk_for(tokens, c) + kTileKeys - 1) / kTileKeys;
    const int64_t splits = std::min<int64_t>(TRIMODE_MAX_SPLITS, key_tiles);
    if (splits <= 1) return 0;
    const double bytes = double(splits) * tokens * c.num_heads * (c.head_dim + 1.0) * sizeof(float);
    return bytes >= double(kWorkspaceCap) ? kWorkspaceCap : static_cast<size_t>(bytes);
}

// Heads and head_dim as the tensor spells them after `lead` leading dims: [.., H, D] or [.., H * D].
bool heads_match(const Dims& dims, int32_t lead, int32_t heads, int32_t head_dim) {
    if (dims.nbDims == lead + 2) return dims.d[lead] == heads && dims.d[lead + 1] == head_dim;
    if (dims.nbDims == lead + 1) return dims.d[lead] == int64_t(heads) * head_dim;
    return false;
}

bool same_dims(const Dims& a, const Dims& b) {
    if (a.nbDims != b.nbDims) return false;
    for (int32_t i = 0; i < a.nbDims; ++i)
        if (a.d[i] != b.d[i]) return false;
    return true;
}

// The runtime shapes against the contract and the fields: nullptr when they agree, else what is wrong.
const char* shape_error(const nvinfer1::PluginTensorDesc* in, const BlockAttentionConfig& c) {
    const Dims& q = in[kQ].dims;
    const Dims& k = in[kKNew].dims;
    const Dims& cache = in[kKCache].dims;
    if (!heads_match(q, 1, c.num_heads, c.head_dim) || !heads_match(k, 1, c.num_kv_heads, c.head_dim) ||
        !heads_match(cache, 2, c.num_kv_heads, c.head_dim))
        return "tensor head sizes do not match the num_heads/num_kv_heads/head_dim fields";
    if (!same_dims(k, in[kVNew].dims) || !same_dims(cache, in[kVCache].dims))
        return "v_new and v_cache must have the shapes of k_new and k_cache";
    if (k.d[0] != q.d[0]) return "k_new/v_new must have q's token count N";
    const Dims& table = in[kPageTable].dims;
    if (table.nbDims != 2) return "page_table must be [B, T]";
    for (const int i : {kCacheLens, kMaskKind, kMaskParam})
        if (in[i].dims.nbDims != 1 || in[i].dims.d[0] != table.d[0])
            return "cache_lens, mask_kind and mask_param must be [B], B = page_table's first dimension";
    if (in[kCuSeqlens].dims.nbDims != 1 || in[kCuSeqlens].dims.d[0] != table.d[0] + 1)
        return "cu_seqlens must be [B + 1]";
    if (table.d[0] > 0 && (table.d[1] < 1 || cache.d[0] < 1 || cache.d[1] < 1))
        return "page_table needs T >= 1 entries per row and the caches at least one page of one position";
    if (table.d[1] * cache.d[1] > kMaxRowPositions) return "a page table addresses more than 2^30 positions";
    return nullptr;
}

bool read_int(const PluginField& f, int32_t* value) {
    if (f.data == nullptr || f.length < 1) return false;
    if (f.type == PluginFieldType::kINT32) {
        *value = *static_cast<const int32_t*>(f.data);
        return true;
    }
    if (f.type == PluginFieldType::kINT64) {
        *value = static_cast<int32_t>(*static_cast<const int64_t*>(f.data));
        return true;
    }
    return false;
}

bool read_float(const PluginField& f, float* value) {
    if (f.data == nullptr || f.length < 1) return false;
    if (f.type == PluginFieldType::kFLOAT32) {
        *value = *static_cast<const float*>(f.data);
        return true;
    }
    if (f.type == PluginFieldType::kFLOAT64) {
        *value = static_cast<float>(*static_cast<const double*>(f.data));
        return true;
    }
    return false;
}

std::vector<PluginField> serialized_fields(const BlockAttentionConfig& c) {
    return {PluginField("num_heads", &c.num_heads, PluginFieldType::kINT32, 1),
            PluginField("num_kv_heads", &c.num_kv_heads, PluginFieldType::kINT32, 1),
            PluginField("head_dim", &c.head_dim, PluginFieldType::kINT32, 1),
            PluginField("scale", &c.scale, PluginFieldType::kFLOAT32, 1),
            PluginField("max_chunk", &c.max_chunk, PluginFieldType::kINT32, 1),
            PluginField("max_cache_len", &c.max_cache_len, PluginFieldType::kINT32, 1)};
}

}  // namespace

bool parse_config(const nvinfer1::PluginFieldCollection* fc, BlockAttentionConfig* config, std::string* error) {
    BlockAttentionConfig c;
    bool has_heads = false, has_kv_heads = false, has_head_dim = false;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        const PluginField& f = fc->fields[i];
        if (f.name == nullptr) continue;
        const std::string name = f.name;
        bool ok = true;
        if (name == "num_heads") ok = has_heads = read_int(f, &c.num_heads);
        else if (name == "num_kv_heads") ok = has_kv_heads = read_int(f, &c.num_kv_heads);
        else if (name == "head_dim") ok = has_head_dim = read_int(f, &c.head_dim);
        else if (name == "scale") ok = read_float(f, &c.scale);
        else if (name == "max_chunk") ok = read_int(f, &c.max_chunk);
        else if (name == "max_cache_len") ok = read_int(f, &c.max_cache_len);
        if (!ok) {
            *error = "field " + name + " has an unsupported type or no data";
            return false;
        }
    }
    if (!has_heads || !has_kv_heads || !has_head_dim) {
        *error = "fields num_heads, num_kv_heads and head_dim are required";
        return false;
    }
    if (c.num_heads <= 0 || c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0) {
        *error = error_string(TRIMODE_ERR_GQA);
        return false;
    }
    if (c.head_dim != 64 && c.head_dim != 128) {
        *error = error_string(TRIMODE_ERR_HEAD_DIM);
        return false;
    }
    if (c.max_chunk < 0 || c.max_cache_len < 0) {
        *error = "max_chunk and max_cache_len must be >= 0 (0: no bound beyond N / T * S)";
        return false;
    }
    if (!(c.scale > 0.0f)) c.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    *config = c;
    return true;
}

// ---- BlockAttentionPlugin -------------------------------------------------------------------------------------

BlockAttentionPlugin::BlockAttentionPlugin(const BlockAttentionConfig& config)
    : config_(config), fields_(serialized_fields(config_)) {
    field_collection_.nbFields = static_cast<int32_t>(fields_.size());
    field_collection_.fields = fields_.data();
}

BlockAttentionPlugin::BlockAttentionPlugin(const BlockAttentionPlugin& other)
    : BlockAttentionPlugin(other.config_) {}  // the fields must point at the copy's own config

nvinfer1::IPluginCapability* BlockAttentionPlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept {
    switch (type) {
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* BlockAttentionPlugin::clone() noexcept { return new (std::nothrow) BlockAttentionPlugin(*this); }

const char* BlockAttentionPlugin::getPluginName() const noexcept { return kPluginName; }
const char* BlockAttentionPlugin::getPluginVersion() const noexcept { return kPluginVersion; }
const char* BlockAttentionPlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }

int32_t BlockAttentionPlugin::configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nbInputs,
                                              const nvinfer1::DynamicPluginTensorDesc*, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1) {
        log_error(std::string("expects 10 inputs (") + kInputList + ") and 1 output");
        return 1;
    }
    const Dims& q = in[kQ].desc.dims;
    const Dims& k = in[kKNew].desc.dims;
    const Dims& cache = in[kKCache].desc.dims;
    // Ranks only; sizes (-1 at build time) are checked in onShapeChange and enqueue.
    const bool q_ok = q.nbDims == 2 || q.nbDims == 3;
    const bool kv_ok = (k.nbDims == 2 || k.nbDims == 3) && cache.nbDims == k.nbDims + 1;
    if (!q_ok || !kv_ok) {
        log_error("q/k_new/v_new must be [N, H, D] or [N, H*D] and the caches [P, S, Hkv, D] or [P, S, Hkv*D]");
        return 1;
    }
    if (in[kPageTable].desc.dims.nbDims != 2) {
        log_error("page_table must be 2-D: [B, T]");
        return 1;
    }
    for (const int32_t i : {kCuSeqlens, kCacheLens, kMaskKind, kMaskParam})
        if (in[i].desc.dims.nbDims != 1) {
            log_error("cu_seqlens, cache_lens, mask_kind and mask_param must be 1-D");
            return 1;
        }
    return 0;
}

int32_t BlockAttentionPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                                                 int32_t nbInputs) const noexcept {
    if (nbOutputs != 1 || nbInputs != kNbInputs) return 1;
    outputTypes[0] = inputTypes[kQ];
    return 0;
}

int32_t BlockAttentionPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs,
                                              const nvinfer1::DimsExprs*, int32_t, nvinfer1::DimsExprs* outputs,
                                              int32_t nbOutputs, nvinfer1::IExprBuilder&) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1) return 1;
    outputs[0] = inputs[kQ];
    return 0;
}

bool BlockAttentionPlugin::supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut,
                                                     int32_t nbInputs, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1 || pos < 0 || pos >= kNbInputs + 1) return false;
    const nvinfer1::PluginTensorDesc& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    if (pos >= kCuSeqlens && pos <= kMaskParam) return desc.type == DataType::kINT32;
    if (pos == kQ) return dtype_code(desc.type) >= 0;
    return desc.type == inOut[kQ].desc.type;  // k/v tensors and the output follow q
}

int32_t BlockAttentionPlugin::getNbOutputs() const noexcept { return 1; }

size_t BlockAttentionPlugin::getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                                              const nvinfer1::DynamicPluginTensorDesc*, int32_t) const noexcept {
    if (nbInputs != kNbInputs) return 0;
    // The most positions a page table of the profile's max shape addresses: max T times the page size.
    return workspace_bound(inputs[kQ].max.d[0], inputs[kPageTable].max.d[1] * inputs[kKCache].max.d[1], config_);
}

int32_t BlockAttentionPlugin::onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nbInputs,
                                            const nvinfer1::PluginTensorDesc*, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != 1) return 1;
    if (const char* error = shape_error(in, config_)) {
        log_error(error);
        return 1;
    }
    return 0;
}

int32_t BlockAttentionPlugin::enqueue(const nvinfer1::PluginTensorDesc* inputDesc, const nvinfer1::PluginTensorDesc*,
                                      const void* const* inputs, void* const* outputs, void* workspace,
                                      cudaStream_t stream) noexcept {
    if (const char* error = shape_error(inputDesc, config_)) {
        log_error(error);
        return TRIMODE_ERR_INVALID_SHAPE;
    }
    const int64_t tokens = inputDesc[kQ].dims.d[0];
    const int64_t rows = inputDesc[kPageTable].dims.d[0];
    const int64_t pages_per_row = inputDesc[kPageTable].dims.d[1];
    const Dims& cache = inputDesc[kKCache].dims;
    const int64_t addressable = pages_per_row * cache.d[1];  // T * S
    if (tokens == 0) return 0;  // nothing to compute
    if (rows == 0) {
        log_error("tokens but no rows (B = 0): the output would be undefined");
        return TRIMODE_ERR_INVALID_SHAPE;
    }
    TrimodeAttentionParams p{};
    p.abi_version = TRIMODE_ATTENTION_ABI_VERSION;
    p.dtype = dtype_code(inputDesc[kQ].type);
    p.num_rows = static_cast<int32_t>(rows);
    p.num_tokens = static_cast<int32_t>(tokens);
    p.num_heads = config_.num_heads;
    p.num_kv_heads = config_.num_kv_heads;
    p.head_dim = config_.head_dim;
    p.num_pages = static_cast<int32_t>(cache.d[0]);
    p.page_size = static_cast<int32_t>(cache.d[1]);
    p.pages_per_row = static_cast<int32_t>(pages_per_row);
    p.max_chunk = static_cast<int32_t>(max_chunk_for(tokens, config_));
    p.max_cache_len = max_cache_len_for(addressable, config_);
    p.scale = config_.scale;
    p.q = inputs[kQ];
    p.k_new = inputs[kKNew];
    p.v_new = inputs[kVNew];
    p.k_cache = const_cast<void*>(inputs[kKCache]);  // never written: write = NULL
    p.v_cache = const_cast<void*>(inputs[kVCache]);
    // Device memory, read by the kernel itself: nothing here waits for the device.
    p.cu_seqlens = static_cast<const int32_t*>(inputs[kCuSeqlens]);
    p.page_table = static_cast<const int32_t*>(inputs[kPageTable]);
    p.cache_lens = static_cast<const int32_t*>(inputs[kCacheLens]);
    p.mask_kind = static_cast<const int32_t*>(inputs[kMaskKind]);
    p.mask_param = static_cast<const int32_t*>(inputs[kMaskParam]);
    p.write = nullptr;
    p.out = outputs[0];
    p.workspace = workspace;
    p.workspace_size = workspace ? workspace_bound(tokens, addressable, config_) : 0;
    const int status = trimode_block_attention(&p, stream);
    if (status != TRIMODE_OK) log_error(trimode_error_string(status));
    return status;
}

nvinfer1::IPluginV3* BlockAttentionPlugin::attachToContext(nvinfer1::IPluginResourceContext*) noexcept {
    return clone();
}

const nvinfer1::PluginFieldCollection* BlockAttentionPlugin::getFieldsToSerialize() noexcept {
    return &field_collection_;
}

// ---- BlockAttentionCreator ------------------------------------------------------------------------------------

BlockAttentionCreator::BlockAttentionCreator()
    : fields_{PluginField("num_heads", nullptr, PluginFieldType::kINT32, 1),
              PluginField("num_kv_heads", nullptr, PluginFieldType::kINT32, 1),
              PluginField("head_dim", nullptr, PluginFieldType::kINT32, 1),
              PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1),
              PluginField("max_chunk", nullptr, PluginFieldType::kINT32, 1),
              PluginField("max_cache_len", nullptr, PluginFieldType::kINT32, 1)} {
    field_collection_.nbFields = static_cast<int32_t>(fields_.size());
    field_collection_.fields = fields_.data();
}

nvinfer1::IPluginV3* BlockAttentionCreator::createPlugin(const char*, const nvinfer1::PluginFieldCollection* fc,
                                                         nvinfer1::TensorRTPhase) noexcept {
    BlockAttentionConfig config;
    std::string error;
    if (!parse_config(fc, &config, &error)) {
        log_error(error);
        return nullptr;
    }
    return new (std::nothrow) BlockAttentionPlugin(config);
}

const nvinfer1::PluginFieldCollection* BlockAttentionCreator::getFieldNames() noexcept { return &field_collection_; }
const char* BlockAttentionCreator::getPluginName() const noexcept { return kPluginName; }
const char* BlockAttentionCreator::getPluginVersion() const noexcept { return kPluginVersion; }
const char* BlockAttentionCreator::getPluginNamespace() const noexcept { return kPluginNamespace; }

}  // namespace trt
}  // namespace trimode

extern "C" {

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { trimode::trt::g_logger_finder = finder; }

nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static trimode::trt::BlockAttentionCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

}  // extern "C"
