"""Per-image placeholder strings shared by the datasets and the embedding manager.

The 22 Hebrew letters of the reference (`per_img_token_list`), in its order: with `per_image_tokens`,
image i of the training set gets the extra pseudo-word `per_img_token_list[i]` in dual-template captions.
"""

per_img_token_list = [
    "\u05d0", "\u05d1", "\u05d2", "\u05d3", "\u05d4", "\u05d5", "\u05d6", "\u05d7", "\u05d8", "\u05d9", "\u05db",
    "\u05dc", "\u05de", "\u05e0", "\u05e1", "\u05e2", "\u05e4", "\u05e6", "\u05e7", "\u05e8", "\u05e9", "\u05ea",
]
