"""Block attention plugin: the contract (`reference`), the C API bindings (`native`), the torch op
(`torch_op`).


`torch_op` and `native` are imported on demand (they load shared libraries built by `make -C plugins`), so
importing this package stays cheap and works where nothing is built.
"""
