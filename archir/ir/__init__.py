"""The IR core: the graph (:mod:`.graph`), lowering to ``torch.fx`` (:mod:`.lower`), the verifier
(:mod:`.verify`), the text and DOT printer (:mod:`.printer`) and operation costs (:mod:`.costs`).

Nothing here imports the passes, frontends, backends or the pipeline.
"""
from .graph import (ATTR_KINDS, COMBINE_KINDS, CONCAT_TARGETS, IN, PRODUCT_TARGETS, SUM_TARGETS, Combine, Edge,
                    Graph, Input, Junction, JunctionRef, Meta, ObjectMeta, Op, Operand, TensorMeta, fetch_attr,
                    map_refs,
                    meta_str, target_name)

__all__ = ["ATTR_KINDS", "COMBINE_KINDS", "CONCAT_TARGETS", "IN", "PRODUCT_TARGETS", "SUM_TARGETS", "Combine",
           "Edge", "Graph", "Input", "Junction", "JunctionRef", "Meta", "ObjectMeta", "Op", "Operand", "TensorMeta",
           "fetch_attr", "map_refs", "meta_str", "target_name"]
