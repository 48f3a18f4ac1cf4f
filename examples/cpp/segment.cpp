// promptseg_segment: segment one query image from one (image, mask) prompt with the two
// AOTInductor packages of `promptseg export --format aoti`.
//
//   promptseg_segment PACKAGE_DIR PROMPT_IMAGE.raw PROMPT_MASK.raw QUERY.raw OUT_MASK.raw
//
// Inputs are raw little-endian float32 buffers at the model resolution R with C channels:
// images C*R*R values in CHW order, in [0, 1]; the mask R*R values, 1 = foreground. The output
// is R*R uint8 (0 or 255). R, C and the prompt-type id come from the metadata embedded in
// prompt_encoder.pt2, so no JSON parser is needed.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>

#include <bit>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using Metadata = std::unordered_map<std::string, std::string>;

static_assert(std::endian::native == std::endian::little, "raw buffers are read as little-endian float32");

// Value of `key` in a package's metadata.
std::string metadata_value(const Metadata& metadata, const std::string& key, const std::string& package) {
  const auto found = metadata.find(key);
  if (found == metadata.end()) {
    throw std::runtime_error(package + ": no '" + key + "' metadata; re-export with promptseg export --format aoti");
  }
  return found->second;
}

// A float32 tensor of `shape` read from a raw file holding exactly that many values.
at::Tensor read_raw(const std::string& path, at::IntArrayRef shape) {
  int64_t count = 1;
  for (const int64_t size : shape) count *= size;
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error(path + ": cannot open");
  const int64_t bytes = static_cast<int64_t>(in.tellg());
  if (bytes != count * 4) {
    throw std::runtime_error(path + ": expected " + std::to_string(count * 4) + " bytes (" + std::to_string(count) +
                             " float32), found " + std::to_string(bytes));
  }
  std::vector<float> values(count);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(values.data()), bytes);
  if (!in) throw std::runtime_error(path + ": read failed");
  return at::from_blob(values.data(), shape, at::kFloat).clone();
}

// A package loader for `path`; errors name the file.
std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load_package(const std::string& path) {
  if (!std::ifstream(path).good()) throw std::runtime_error(path + ": not found; run promptseg export --format aoti");
  try {
    return std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
  } catch (const std::exception& error) {
    const std::string message = error.what();
    const std::string reason = message.substr(0, message.find('\n'));
    throw std::runtime_error(path + ": not a loadable AOTInductor package (" + reason + ")");
  }
}

// Write an (R, R) uint8 CPU tensor as raw bytes.
void write_raw(const std::string& path, const at::Tensor& mask) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(mask.const_data_ptr<uint8_t>()), mask.numel());
  if (!out) throw std::runtime_error(path + ": write failed");
}

int run(const std::string& dir, const std::string& image_path, const std::string& mask_path,
        const std::string& query_path, const std::string& out_path) {
  const std::string encoder_path = dir + "/prompt_encoder.pt2";
  const auto encoder = load_package(encoder_path);
  const auto decoder = load_package(dir + "/query_decoder.pt2");
  const Metadata metadata = encoder->get_metadata();
  const int64_t r = std::stoll(metadata_value(metadata, "promptseg.resolution", encoder_path));
  const int64_t c = std::stoll(metadata_value(metadata, "promptseg.in_channels", encoder_path));
  const int64_t mask_type = std::stoll(metadata_value(metadata, "promptseg.mask_prompt_type", encoder_path));
  const at::Device device(metadata_value(metadata, "AOTI_DEVICE_KEY", encoder_path));  // "cpu" or "cuda"

  // One prompt (K = 1) and one query (B = 1); both graphs accept any K and B.
  const at::Tensor images = read_raw(image_path, {1, 1, c, r, r}).to(device);
  const at::Tensor maps = read_raw(mask_path, {1, 1, r, r}).to(device);
  const at::Tensor types = at::full({1, 1}, mask_type, at::TensorOptions().dtype(at::kLong).device(device));
  const at::Tensor query = read_raw(query_path, {1, c, r, r}).to(device);

  std::vector<at::Tensor> decoder_inputs{query};
  for (at::Tensor& tensor : encoder->run({images, maps, types})) decoder_inputs.push_back(std::move(tensor));
  const at::Tensor logits = decoder->run(decoder_inputs).at(0);  // (1, R, R)

  const at::Tensor foreground = logits[0].gt(0).to(at::kCPU).contiguous();
  write_raw(out_path, foreground.to(at::kByte).mul(255));
  std::cout << "foreground fraction " << foreground.to(at::kFloat).mean().item<double>() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: promptseg_segment PACKAGE_DIR PROMPT_IMAGE.raw PROMPT_MASK.raw QUERY.raw OUT_MASK.raw\n";
    return 2;
  }
  try {
    return run(argv[1], argv[2], argv[3], argv[4], argv[5]);
  } catch (const std::exception& error) {
    // c10::Error messages carry a C++ backtrace after the first line; keep the first line.
    const std::string message = error.what();
    std::cerr << "promptseg_segment: " << message.substr(0, message.find('\n')) << "\n";
    return 1;
  }
}
