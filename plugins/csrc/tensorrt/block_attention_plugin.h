// TensorRT IPluginV3 wrapper of the block attention C API: plugin "BlockAttention", namespace "trimode",
// version "1". It is the op behind the ONNX node `BlockAttention` of an exported trimode model.
//
// Inputs (all linear/contiguous), in the order of the ONNX node builder/onnx_export.py emits:
//   0 q           [B, T, Hq * D] or [B, T, Hq, D]     fp32 / fp16 / bf16 (the export: [B, T, Hq, D])
//   1 k_new       [B, T, Hkv * D] or [B, T, Hkv, D]   same dtype as q
//   2 v_new       like k_new
//   3 k_cache     [B, L, Hkv * D] or [B, L, Hkv, D]   one cache per sequence: row b is sequence b's (no slots)
//   4 v_cache     like k_cache
//   5 cache_lens  [B] int32
//   6 chunk_lens  [B] int32
//   7 mask_kind   [1] int32 (one element, any rank)   0 causal, 1 bidirectional block
// Output: out, same shape and dtype as q. TensorRT tensors are immutable inside a plan, so the plugin never
// writes the cache (write_kv = 0); the network writes it with its own scatter/concat if it needs to.
//
// The mask kind is per execution: input 7 is handed to the kernel as mask_kind_device, which reads it on the
// device (no host sync, so an engine with this plugin stays CUDA-graph capturable), and one plan serves
// causal steps (prefill, decode, verify) and bidirectional ones (draft). A value other than 0 or 1 gives an
// all-zero output (the kernel cannot report device data). Fields: num_heads, num_kv_heads, head_dim (int32,
// required), scale (float32; default head_dim ** -0.5) - the attribute names of the ONNX node - and the
// optional mask_kind (int32): absent or -1 reads input 7; 0 or 1 fixes the kind and input 7 is ignored.
#ifndef TRIMODE_BLOCK_ATTENTION_PLUGIN_H
#define TRIMODE_BLOCK_ATTENTION_PLUGIN_H

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace trimode {
namespace trt {

constexpr char kPluginName[] = "BlockAttention";
constexpr char kPluginVersion[] = "1";
constexpr char kPluginNamespace[] = "trimode";

// Value of the mask_kind field meaning "read the kind from input 7 at execution time".
constexpr int32_t kMaskKindFromInput = -1;

struct BlockAttentionConfig {
    int32_t mask_kind = kMaskKindFromInput;  // or a fixed TrimodeMaskKind (0 / 1)
    int32_t num_heads = 0;
    int32_t num_kv_heads = 0;
    int32_t head_dim = 0;
    float scale = 0.0f;
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
