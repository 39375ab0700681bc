"""Artefact builders for ``fermi export`` (ONNX, Core ML).

Imported only by the export command and its tests: serving loads finished artefacts
through ``fermi.runners.artefact`` and never imports onnx or coremltools from here.
"""
