"""Communication: process-group bootstrap, NVSHMEM symmetric workspace, CPU workspace.

Import rule: `comm/` never imports `kernels/` or `layer.py`.
"""
