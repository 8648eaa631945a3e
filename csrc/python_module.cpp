// An empty Python module `_C` so that `import mage._C` loads this shared library, whose
// TORCH_LIBRARY blocks then register mage::pema_update_ with the dispatcher (as in
// pytorch/extension-cpp). setup.py builds the library under the name mage._C.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "Native ops of mage (mage::pema_update_)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}
