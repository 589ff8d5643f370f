// Blending indices: which dataset, and which sample of it, fills each position of a blended dataset.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "megalith/data.h"
#include "megalith/error.h"

namespace megalith::data {

namespace {
void check_dataset_count(int64_t num_datasets) {
  MEGALITH_CHECK(num_datasets >= 1, "at least one dataset is needed, got ", num_datasets);
  MEGALITH_CHECK(num_datasets <= std::numeric_limits<int16_t>::max(), "at most ",
                 std::numeric_limits<int16_t>::max(), " datasets can be blended, got ", num_datasets);
}
}  // namespace

void build_blending_index(const double* weights, int64_t num_datasets, int64_t size, int16_t* dataset_index,
                          int64_t* dataset_sample_index) {
  check_dataset_count(num_datasets);
  MEGALITH_CHECK(size >= 0, "size must be non-negative, got ", size);
  for (int64_t k = 0; k < num_datasets; ++k) {
    MEGALITH_CHECK(std::isfinite(weights[k]) && weights[k] >= 0.0, "weights[", k,
                   "] must be a finite non-negative number, got ", weights[k]);
  }
  std::vector<int64_t> taken(static_cast<size_t>(num_datasets), 0);
  for (int64_t i = 0; i < size; ++i) {
    // Position 0 is treated as 1 so the first pick already follows the weights.
    const double position = std::max(static_cast<double>(i), 1.0);
    int64_t best = 0;
    double best_error = weights[0] * position - static_cast<double>(taken[0]);
    for (int64_t k = 1; k < num_datasets; ++k) {
      const double error = weights[k] * position - static_cast<double>(taken[k]);
      if (error > best_error) {
        best_error = error;
        best = k;
      }
    }
    dataset_index[i] = static_cast<int16_t>(best);
    dataset_sample_index[i] = taken[best]++;
  }
}

void build_exhaustive_blending_index(const int64_t* sizes, int64_t num_datasets, int16_t* dataset_index,
                                     int64_t* dataset_sample_index) {
  check_dataset_count(num_datasets);
  int64_t total = 0;
  for (int64_t k = 0; k < num_datasets; ++k) {
    MEGALITH_CHECK(sizes[k] >= 0, "sizes[", k, "] must be non-negative, got ", sizes[k]);
    total += sizes[k];
  }
  std::vector<double> weights(static_cast<size_t>(num_datasets));
  std::vector<int64_t> taken(static_cast<size_t>(num_datasets), 0);
  // Datasets still holding unused samples, in increasing index order so ties go to the lowest index.
  std::vector<int64_t> open;
  for (int64_t k = 0; k < num_datasets; ++k) {
    weights[k] = total > 0 ? static_cast<double>(sizes[k]) / static_cast<double>(total) : 0.0;
    if (sizes[k] > 0) open.push_back(k);
  }
  for (int64_t i = 0; i < total; ++i) {
    const double position = std::max(static_cast<double>(i), 1.0);
    size_t best_slot = 0;
    double best_error = -std::numeric_limits<double>::infinity();
    for (size_t slot = 0; slot < open.size(); ++slot) {
      const int64_t k = open[slot];
      const double error = weights[k] * position - static_cast<double>(taken[k]);
      if (error > best_error) {
        best_error = error;
        best_slot = slot;
      }
    }
    const int64_t best = open[best_slot];
    dataset_index[i] = static_cast<int16_t>(best);
    dataset_sample_index[i] = taken[best]++;
    if (taken[best] == sizes[best]) open.erase(open.begin() + static_cast<std::ptrdiff_t>(best_slot));
  }
}

}  // namespace megalith::data
