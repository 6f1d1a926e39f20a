"""What runs one compiled step over the busy slot rows.

Modules: ``models`` (the Keras layer chain and its stateful serving clone), ``buckets``
(power-of-two padding of chunk lengths), ``fused`` (the fused XLA recurrent layers),
``keras_runner`` (the Keras executor: reference and fallback), ``ort`` with ``onnx_graph``
and ``onnx_layers`` (the ONNX Runtime executor: the CPU default), ``torch_rnn`` with
``torch_spec`` and ``torch_layers`` (the torch executor: optional, cuDNN on a GPU),
``padding``, ``rows`` and ``precision`` (what the executors share). :mod:`streamrnn.engine.backends`
chooses among them.
"""

__all__: list[str] = []
