"""BiomedCLIP (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224): 2D vision-language
model for zero-shot findings, image/text embeddings and text-to-image search."""
