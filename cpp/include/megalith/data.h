// Torch-free declarations of the dataset index builders (GPT sample index, blending indices).
//
// The algorithms follow the Megatron-LM dataset semantics (see packages/data/README.md), so the same corpus,
// seed and sequence length select the same tokens in the same order as Megatron-LM does.
#pragma once

#include <cstdint>
#include <vector>

namespace megalith::data {

// Number of samples that E epochs of `tokens_per_epoch` tokens give at `seq_length` tokens per sample, when
// consecutive samples overlap by `extra_token` (0 or 1) tokens.
int64_t count_samples(int64_t num_epochs, int64_t tokens_per_epoch, int32_t seq_length, int32_t extra_token,
                      bool drop_last_partial);

// Fills `out` (shape [num_samples + 1, 2], row-major) with the start boundary of every sample: the position
// in `document_index` and the token offset inside that document. `sizes[d]` is the token count of document d.
// Throws megalith::Error on inconsistent inputs (a document id outside `sizes`, too few tokens, ...).
template <typename DocT, typename OutT>
void build_sample_index(const int32_t* sizes, int64_t num_sizes, const DocT* document_index,
                        int64_t num_documents, int32_t seq_length, int32_t extra_token, int64_t num_samples,
                        OutT* out);

// Greedy proportional interleave: sample i goes to the dataset whose weight * max(i, 1) most exceeds the
// number of samples it already has (ties go to the lowest index).
void build_blending_index(const double* weights, int64_t num_datasets, int64_t size, int16_t* dataset_index,
                          int64_t* dataset_sample_index);

// Like build_blending_index, but every sample of every dataset is used exactly once: weights are the dataset
// sizes over their sum and exhausted datasets leave the competition. Output length is the sum of `sizes`.
void build_exhaustive_blending_index(const int64_t* sizes, int64_t num_datasets, int16_t* dataset_index,
                                     int64_t* dataset_sample_index);

}  // namespace megalith::data
