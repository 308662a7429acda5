"""MetaPix (meta pixel weighting for domain transfer in semantic segmentation) in JAX/Flax.

Importing the package makes clu's metric writers write TensorBoard files without TensorFlow
(`clu_summary_writer.install()`: standard library only, so the import stays cheap), before any
module here imports clu.
"""

from metapix_jax import clu_summary_writer

clu_summary_writer.install()
