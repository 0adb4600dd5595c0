"""Live imports for every format: any source, decoded by the module's own
readers, served to librbd as a plain qcow2 file it reads correctly
(``view.py``), so that librbd's own import-only migration gives clients the
target from prepare on whatever the source's format."""
