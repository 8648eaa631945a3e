"""Data: tokenizer, task specs, Continual-NExT-mini generator, release readers, image views, collation.

Import the submodules directly (`mage.data.tokenizer`, `.tasks`, `.mini`, `.readers`, `.images`,
`.collate`, `.dataset`); this package keeps its import light.
"""
