// GPT sample-index builder: where each fixed-length training sample starts inside the shuffled documents.
#include <cstdint>
#include <limits>

#include "megalith/data.h"
#include "megalith/error.h"

namespace megalith::data {

int64_t count_samples(int64_t num_epochs, int64_t tokens_per_epoch, int32_t seq_length, int32_t extra_token,
                      bool drop_last_partial) {
  MEGALITH_CHECK(seq_length > 0, "seq_length must be positive, got ", seq_length);
  MEGALITH_CHECK(extra_token == 0 || extra_token == 1, "extra_token must be 0 or 1, got ", extra_token);
  MEGALITH_CHECK(num_epochs >= 1, "num_epochs must be at least 1, got ", num_epochs);
  MEGALITH_CHECK(tokens_per_epoch >= 0, "tokens_per_epoch must be non-negative, got ", tokens_per_epoch);
  MEGALITH_CHECK(tokens_per_epoch == 0 || num_epochs <= std::numeric_limits<int64_t>::max() / tokens_per_epoch,
                 "num_epochs * tokens_per_epoch overflows int64 (", num_epochs, " * ", tokens_per_epoch, ")");
  const int64_t usable = num_epochs * tokens_per_epoch - extra_token;
  if (usable <= 0) return 0;
  return drop_last_partial ? usable / seq_length : (usable + seq_length - 1) / seq_length;
}

template <typename DocT, typename OutT>
void build_sample_index(const int32_t* sizes, int64_t num_sizes, const DocT* document_index,
                        int64_t num_documents, int32_t seq_length, int32_t extra_token, int64_t num_samples,
                        OutT* out) {
  MEGALITH_CHECK(seq_length > 0, "seq_length must be positive, got ", seq_length);
  MEGALITH_CHECK(extra_token == 0 || extra_token == 1, "extra_token must be 0 or 1, got ", extra_token);
  MEGALITH_CHECK(num_samples >= 0, "num_samples must be non-negative, got ", num_samples);
  MEGALITH_CHECK(num_samples == 0 || num_documents > 0, "document_index is empty but ", num_samples,
                 " samples were requested");

  // Position in document_index and token offset inside that document where the next sample starts.
  int64_t position = 0;
  int64_t offset = 0;
  out[0] = 0;
  out[1] = 0;
  auto document_size = [&](int64_t pos) -> int64_t {
    const int64_t doc = static_cast<int64_t>(document_index[pos]);
    if (doc < 0 || doc >= num_sizes) {
      fail("document_index[", pos, "] = ", doc, " is outside sizes (", num_sizes, " documents)");
    }
    const int32_t size = sizes[doc];
    if (size < 0) fail("sizes[", doc, "] = ", size, " is negative");
    return size;
  };

  for (int64_t sample = 1; sample <= num_samples; ++sample) {
    // Each sample consumes seq_length + extra_token tokens; the extra token is shared with the next sample
    // (it is the label of the last input position), hence the "- extra_token" when the budget runs out.
    int64_t remaining = static_cast<int64_t>(seq_length) + extra_token;
    while (remaining != 0) {
      const int64_t size = document_size(position);
      const int64_t available = size - offset;
      remaining -= available;
      if (remaining <= 0) {
        offset += remaining + available - extra_token;
        remaining = 0;
      } else if (position == num_documents - 1) {
        // Out of documents: only the final, partial sample may end here.
        if (sample != num_samples) {
          fail("document_index runs out of tokens at sample ", sample, " of ", num_samples,
               " (num_epochs * tokens_per_epoch is larger than the documents hold)");
        }
        offset = size - extra_token;
        remaining = 0;
      } else {
        ++position;
        offset = 0;
      }
    }
    out[2 * sample] = static_cast<OutT>(position);
    out[2 * sample + 1] = static_cast<OutT>(offset);
  }
}

template void build_sample_index<int32_t, int32_t>(const int32_t*, int64_t, const int32_t*, int64_t, int32_t,
                                                   int32_t, int64_t, int32_t*);
template void build_sample_index<int32_t, int64_t>(const int32_t*, int64_t, const int32_t*, int64_t, int32_t,
                                                   int32_t, int64_t, int64_t*);
template void build_sample_index<int64_t, int32_t>(const int32_t*, int64_t, const int64_t*, int64_t, int32_t,
                                                   int32_t, int64_t, int32_t*);
template void build_sample_index<int64_t, int64_t>(const int32_t*, int64_t, const int64_t*, int64_t, int32_t,
                                                   int32_t, int64_t, int64_t*);

}  // namespace megalith::data
