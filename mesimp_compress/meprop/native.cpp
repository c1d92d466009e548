// The compiled meProp backward of nn.Linear (unified top-k, CPU, float32/float64).
//
// Same arithmetic as the Python Function in linear.py, in one autograd node without Python:
// one pass over dy sums |dy| (the unit scores) and dy (the bias gradient); nth_element picks
// the k best units; dy's k columns and W's k rows are gathered into dense blocks for the two
// small matmuls. Row gradients of a weight claimed by a row-sparse optimizer wait in a slot
// until Python collects them (rowgrad.py); hits go straight into the tracker's counters.

#include <torch/extension.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/graph_task.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <numeric>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Where the row gradients of one weight wait while a row-sparse optimizer claims it.
struct Slot {
  bool claimed = false;
  std::vector<std::pair<Tensor, Tensor>> rows;  // (units, values)
};

std::mutex mutex;  // slots, and the tracker counters a backward adds into
std::unordered_map<int64_t, Slot> slots;
int64_t next_handle = 0;

// What this backward pass does with the weight's gradient: 0 accumulates it into .grad
// (backward()), 1 returns it (autograd.grad asked for the weight), 2 does not use it.
int weight_use(const Tensor& weight) {
  const auto* info = torch::autograd::get_current_graph_task_exec_info();
  if (info == nullptr || info->empty()) {
    return 0;
  }
  auto accumulator = torch::autograd::impl::try_get_grad_accumulator(weight);
  if (!accumulator) {
    return 2;
  }
  auto it = info->find(accumulator.get());
  if (it == info->end()) {
    return 2;
  }
  if (it->second.captures_) {
    return 1;
  }
  return it->second.needed_ ? 0 : 2;
}

// Scores (sum of |dy| over rows), the bias gradient when asked, and the k best units:
// NaN ranks above every number (as in torch.topk) and equal scores go to the lower index
// (torch.topk leaves that open; this picks the same units on every run and machine).
template <typename T>
void select_units(const Tensor& dy, int64_t k, T* bias, int64_t* units) {
  const int64_t rows = dy.size(0), width = dy.size(1);
  const T* d = dy.data_ptr<T>();
  std::vector<T> score(width, T(0));
  T* s = score.data();
  for (int64_t i = 0; i < rows; ++i) {
    const T* r = d + i * width;
    if (bias != nullptr) {
      for (int64_t j = 0; j < width; ++j) {
        s[j] += std::abs(r[j]);
        bias[j] += r[j];
      }
    } else {
      for (int64_t j = 0; j < width; ++j) {
        s[j] += std::abs(r[j]);
      }
    }
  }
  std::vector<int64_t> order(width);
  std::iota(order.begin(), order.end(), 0);
  auto before = [s](int64_t a, int64_t b) {
    const bool nan_a = std::isnan(s[a]), nan_b = std::isnan(s[b]);
    if (nan_a != nan_b) {
      return nan_a;
    }
    if (!nan_a && s[a] != s[b]) {
      return s[a] > s[b];
    }
    return a < b;
  };
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), before);
  std::copy(order.begin(), order.begin() + k, units);
}

// out[i, j] = src[i, units[j]] (columns) or out[j, :] = src[units[j], :] (rows).
template <typename T>
Tensor gather_columns(const Tensor& src, const int64_t* units, int64_t k) {
  const int64_t rows = src.size(0), width = src.size(1);
  auto out = torch::empty({rows, k}, src.options());
  const T* s = src.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t i = 0; i < rows; ++i) {
    const T* r = s + i * width;
    T* w = o + i * k;
    for (int64_t j = 0; j < k; ++j) {
      w[j] = r[units[j]];
    }
  }
  return out;
}

template <typename T>
Tensor gather_rows(const Tensor& src, const int64_t* units, int64_t k) {
  const int64_t cols = src.size(1);
  auto out = torch::empty({k, cols}, src.options());
  const T* s = src.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t j = 0; j < k; ++j) {
    std::memcpy(o + j * cols, s + units[j] * cols, cols * sizeof(T));
  }
  return out;
}

struct MePropLinear : public torch::autograd::Function<MePropLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const c10::optional<Tensor>& bias, int64_t k, int64_t slot,
                        const c10::optional<Tensor>& hits,
                        const c10::optional<Tensor>& examples) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["k"] = k;
    ctx->saved_data["slot"] = slot;
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    if (hits.has_value() && examples.has_value()) {
      ctx->saved_data["hits"] = *hits;
      ctx->saved_data["examples"] = *examples;
    }
    return at::linear(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool twice = torch::autograd::GradMode::is_enabled() && grads[0].requires_grad();
    at::NoGradGuard no_grad;
    auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& weight = saved[1];
    const int64_t k = ctx->saved_data["k"].toInt();
    const int64_t width = weight.size(0), fan_in = weight.size(1);
    const Tensor dy = grads[0].to(x.scalar_type()).reshape({-1, width}).contiguous();
    const Tensor x2 = x.reshape({-1, fan_in});
    const int64_t examples = x.size(0);
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    // (autograd numbers the defined tensors only: x, weight, then the bias if there is one)
    const bool need_b = ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2);

    auto units = torch::empty({k}, dy.options().dtype(torch::kLong));
    int64_t* u = units.data_ptr<int64_t>();
    Tensor grad_x, grad_w, grad_b, dy_k;
    if (need_b) {
      grad_b = torch::zeros({width}, dy.options());
    }
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "meprop_linear_backward", [&] {
      select_units<scalar_t>(dy, k, need_b ? grad_b.data_ptr<scalar_t>() : nullptr, u);
      dy_k = gather_columns<scalar_t>(dy, u, k);
      if (need_x) {
        grad_x = at::mm(dy_k, gather_rows<scalar_t>(weight, u, k)).view(x.sizes());
      }
    });

    if (ctx->saved_data.count("hits") != 0) {
      std::lock_guard<std::mutex> lock(mutex);
      int64_t* h = ctx->saved_data["hits"].toTensor().data_ptr<int64_t>();
      for (int64_t j = 0; j < k; ++j) {
        h[u[j]] += examples;
      }
      ctx->saved_data["examples"].toTensor().data_ptr<int64_t>()[0] += examples;
    }

    if (need_w) {
      const int64_t handle = ctx->saved_data["slot"].toInt();
      const int use = weight_use(weight);
      bool claimed = false;
      {
        std::lock_guard<std::mutex> lock(mutex);
        auto it = slots.find(handle);
        claimed = it != slots.end() && it->second.claimed;
      }
      if (!claimed || use != 2) {
        Tensor rows = at::mm(dy_k.t(), x2);
        if (claimed && use == 0) {
          std::lock_guard<std::mutex> lock(mutex);
          slots[handle].rows.emplace_back(units, std::move(rows));
        } else {
          grad_w = torch::zeros_like(weight).index_copy_(0, units, rows);
        }
      }
    }

    variable_list out = {grad_x, grad_w, grad_b, Tensor(), Tensor(), Tensor(), Tensor()};
    if (twice) {  // create_graph=True: as torch's @once_differentiable, differentiable once
      variable_list marked;
      for (int i = 0; i < 3; ++i) {
        marked.push_back(out[i].defined() ? out[i].detach().requires_grad_(true) : Tensor());
      }
      torch::autograd::DelayedError error(
          "trying to differentiate twice a function that was marked with @once_differentiable",
          3);
      marked = error.apply(std::move(marked));
      for (int i = 0; i < 3; ++i) {
        out[i] = marked[i];
      }
    }
    return out;
  }
};

Tensor linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
              int64_t k, int64_t slot, const c10::optional<Tensor>& hits,
              const c10::optional<Tensor>& examples) {
  return MePropLinear::apply(x, weight, bias, k, slot, hits, examples);
}

int64_t new_slot() {
  std::lock_guard<std::mutex> lock(mutex);
  slots.emplace(next_handle, Slot());
  return next_handle++;
}

void free_slot(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex);
  slots.erase(handle);
}

void set_claimed(int64_t handle, bool claimed) {
  std::lock_guard<std::mutex> lock(mutex);
  auto it = slots.find(handle);
  if (it != slots.end()) {
    it->second.claimed = claimed;
  }
}

// The rows waiting in a slot, taken out of it.
std::vector<std::pair<Tensor, Tensor>> take_rows(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex);
  auto it = slots.find(handle);
  if (it == slots.end()) {
    return {};
  }
  return std::exchange(it->second.rows, {});
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "nn.Linear whose backward is meProp's (unified top-k)");
  m.def("new_slot", &new_slot);
  m.def("free_slot", &free_slot);
  m.def("set_claimed", &set_claimed);
  m.def("take_rows", &take_rows);
}
