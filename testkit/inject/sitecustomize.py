"""Loaded at interpreter start when testkit/inject is on PYTHONPATH (testkit.faults.fault_env): when
tasklets.process is imported, patch it with testkit.faults. Nothing else is imported here."""
import importlib.abc
import sys

TARGET = "tasklets.process"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            from testkit.faults import patch_process
            patch_process(module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _PatchOnImport())
