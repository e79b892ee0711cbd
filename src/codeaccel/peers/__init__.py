"""Peers: other libraries' own speed-up methods, run through the same harness for comparison.

They are measured, not reimplemented: each wraps the library's generation call and
passes its tokens through the same :class:`~codeaccel.decoding.generation.StopChecker`, so
every method's output ends by the same rules: llama-cpp-python's prompt lookup
(``llama_prompt_lookup``), transformers' assisted generation and prompt lookup
(``hf_generate``), and llama.cpp's own C++ speculative decoder, run as a subprocess
(``llama_cpp_tools``; built by ``make llama-tools``).
"""
