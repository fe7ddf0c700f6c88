// TensorRT IPluginV3 wrapper of the block attention C API (ABI 4, paged cache): plugin "BlockAttention",
// namespace "trimode", version "1". It is the op behind the ONNX node `BlockAttention` of an exported trimode model.
//
// Inputs (all linear/contiguous), in the node's order:
//   0 q           [N, Hq, D] or [N, Hq * D]         fp32 / fp16 / bf16, packed tokens of every row
//   1 k_new       [N, Hkv, D] or [N, Hkv * D]       same dtype as q
//   2 v_new       like k_new
//   3 k_cache     [P, S, Hkv, D] or [P, S, Hkv * D] one layer's page pool: P pages of S positions (read only)
//   4 v_cache     like k_cache
//   5 cu_seqlens  [B + 1] int32                     row b owns tokens cu_seqlens[b] .. cu_seqlens[b+1]-1
//   6 page_table  [B, T] int32                      position p of row b: page page_table[b, p / S], offset p % S
//   7 cache_lens  [B] int32
//   8 mask_kind   [B] int32                         0 causal, 1 bidirectional, 2 quad, 3 prefix_block
//   9 mask_param  [B] int32                         quad: L; prefix_block: the tail m
// Output: out, the shape and dtype of q. The exported graph is stateless: the plugin NEVER writes the cache
// (write = NULL); the host writes the K/V the graph returns. Every per-row input (the page table too) is device
// memory read by the kernel itself (no host sync, so an engine with this plugin stays CUDA-graph capturable) and
// one plan serves every mix of rows and pages; a row the contract does not define gives zeros and a cached
// position whose page id is outside [0, P) is not attended to (the kernel cannot report device data).
// Fields, named as the node's attributes: num_heads, num_kv_heads, head_dim (int32, required), scale (float32;
// default head_dim ** -0.5), max_chunk (int32, optional: a bound of every n_b; 0 or absent = N, the token
// count, always a valid bound but a larger grid) and max_cache_len (int32, optional: a bound of every p_b;
// 0 or absent = T * S). Unknown fields (plugin_namespace, plugin_version) are ignored.
#ifndef TRIMODE_BLOCK_ATTENTION_PLUGIN_H
#define TRIMODE_BLOCK_ATTENTION_PLUGIN_H

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace trimode {
namespace trt {

constexpr char kPluginName[] = "BlockAttention";
constexpr char kPluginVersion[] = "1";  // the ONNX export asks for "1"
constexpr char kPluginNamespace[] = "trimode";

struct BlockAttentionConfig {
    int32_t num_heads = 0;
    int32_t num_kv_heads = 0;
    int32_t head_dim = 0;
    float scale = 0.0f;
    int32_t max_chunk = 0;      // 0: N
    int32_t max_cache_len = 0;  // 0: T * S
};

class BlockAttentionPlugin : public nvinfer1::IPluginV3,
                             public nvinfer1::IPluginV3OneCore,
                             public nvinfer1::IPluginV3OneBuild,
                             public nvinfer1::IPluginV3OneRuntime {
public:
    explicit BlockAttentionPlugin(const BlockAttentionConfig& config);
    BlockAttentionPlugin(const BlockAttentionPlugin& other);
    BlockAttentionPlugin& operator=(const BlockAttentionPlugin&) = delete;
    ~BlockAttentionPlugin() override = default;

    const BlockAttentionConfig& config() const { return config_; }

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    const char* getPluginName() const noexcept override;
    const char* getPluginVersion() const noexcept override;
    const char* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nbInputs,
                            const nvinfer1::DynamicPluginTensorDesc* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                               const nvinfer1::DataType* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs, const nvinfer1::DimsExprs* shapeInputs,
                            int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                            const nvinfer1::DynamicPluginTensorDesc* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nbInputs, const nvinfer1::PluginTensorDesc* out,
                          int32_t nbOutputs) noexcept override;
    int32_t enqueue(const nvinfer1::PluginTensorDesc* inputDesc, const nvinfer1::PluginTensorDesc* outputDesc,
                    const void* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override;

private:
    BlockAttentionConfig config_;
    std::vector<nvinfer1::PluginField> fields_;
    nvinfer1::PluginFieldCollection field_collection_{};
};

class BlockAttentionCreator : public nvinfer1::IPluginCreatorV3One {
public:
    BlockAttentionCreator();
    nvinfer1::IPluginV3* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;
    const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override;
    const char* getPluginName() const noexcept override;
    const char* getPluginVersion() const noexcept override;
    const char* getPluginNamespace() const noexcept override;

private:
    std::vector<nvinfer1::PluginField> fields_;
    nvinfer1::PluginFieldCollection field_collection_{};
};

// Parses plugin fields into a config; returns false (with a reason) when a field is missing or invalid.
bool parse_config(const nvinfer1::PluginFieldCollection* fc, BlockAttentionConfig* config, std::string* error);

}  // namespace trt
}  // namespace trimode

// TensorRT plugin-library entry points (loaded by IPluginRegistry::loadLibrary, trtexec --dynamicPlugins,
// or trt.get_plugin_registry().load_library()).
extern "C" {
__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
}

#endif  // TRIMODE_BLOCK_ATTENTION_PLUGIN_H
