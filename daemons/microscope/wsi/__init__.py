"""Whole-slide pipeline: registration, placement, pyramid, DICOM WSI, PACS delivery."""
