"""Adapters that let other evaluation frameworks run flexvlm models. Each imports its framework
only when that framework asks for it: flexvlm itself depends on none of them."""


def lmms_eval_models():
    """lmms-eval's manifest of ``--model flexvlm`` (this package's ``lmms_eval.models`` entry
    point). lmms-eval reads it whenever it starts, so it names the adapter's class without
    importing it (and torch with it) until the model is asked for."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="flexvlm", simple_class_path="flexvlm.integrations.lmms_eval.FlexVLMLmms")
