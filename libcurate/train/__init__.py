"""Training jobs as pipeline stages: the trainer contract (:mod:`.contract`), the ``train`` stage
(:mod:`.stage`), a reference VLM that really trains (:mod:`.reference_vlm`), Self-Filter's score net and
weighted loss (:mod:`.self_filter`) and InstructionGPT-4's selector (``ig4_selector``)."""
