// flowkern._C: the Python module that loads the C++ CPU kernels.
// Each op file (csrc/<op>.cpp) registers its schema and CPU implementation in the `flowkern_cpu`
// namespace with TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL; importing this module runs those
// registrations, after which flowkern/ops.py calls them as torch.ops.flowkern_cpu.<op>.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flowkern C++ CPU kernels (registered as torch.ops.flowkern_cpu.*)";
}
