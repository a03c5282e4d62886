"""SegGen (seed 003): ImgSyn and MaskSyn — ``plan`` registers the seggen, imgsyn and masksyn graphs,
``config`` holds their sections, ``expand`` makes the K + M sample rows of a source row."""
