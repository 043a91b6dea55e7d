"""Evaluation: the digit judge, Frechet distance, PSNR/SSIM, digit generation and prompt following."""
