"""The demo model zoos, kept out of the core: models that evomerge builds itself, offline, for the demo,
the tests and the benchmarks.

- :mod:`evomerge.zoos.tiny`: a tiny Llama base and three experts, ``zoo:<name>``
- :mod:`evomerge.zoos.smollm2`: SmolLM2-135M-Instruct, a shared fine-tune of it and three LoRA experts
  fine-tuned from that, ``realzoo:<name>``
- :mod:`evomerge.zoos.skills`: the synthetic skills they learn, and the multiple-choice items measuring them
- :mod:`evomerge.zoos.scoring`: those items scored in-process as lm-eval scores them
- :mod:`evomerge.zoos.build`: what both zoos' builds share (recipe hash, manifest, training plumbing)

The two prefixes register in :data:`evomerge.models.REFERENCES` through evomerge's
``evomerge.model_references`` entry points (``zoo = "evomerge.zoos.tiny:REFERENCE"``, ``realzoo = ...``),
as any package's would: a zoo's module (torch training code) is imported only when a reference first
names its prefix, and the core names no zoo.
"""
