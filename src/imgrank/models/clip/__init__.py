"""The frozen OpenCLIP backbone, split by concern.

* :mod:`~imgrank.models.clip.config`: what a backbone is (names, config JSON, preprocessing);
* :mod:`~imgrank.models.clip.weights`: reading weights files and pretrained tags, safely;
* :mod:`~imgrank.models.clip.build`: building the towers fast (meta device, lazy image tower);
* :mod:`~imgrank.models.clip.towers`: the loaded backbone and its forwards, written once;
* :mod:`~imgrank.models.clip.light_text`: the text tower without open_clip (warm re-sorts).

Code outside :mod:`imgrank.models` reaches a backbone through
:func:`imgrank.models.loading.load_model`, not through these modules.
"""
