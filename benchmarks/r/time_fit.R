# Time lme4::glmer / glmmTMB::glmmTMB fits for the stratafit benchmarks.
#
# Usage: Rscript time_fit.R spec.json
#
# spec.json (written by benchmarks/peers.py):
#   csv      path of the data (written by pandas, header row)
#   levels   {column: [level, ...]} factor columns and their level order
#   formula  lme4 formula (R syntax)
#   family   "binomial" | "poisson" | "gaussian"
#   engine   "glmer" | "glmmTMB"
#   mode     "single": 1 warm-up fit, then `reps` timed fits of the whole data
#            "batch":  1 warm-up fit on the first stratum, then `reps` timed loops,
#                      each fitting every stratum (split by column `by`) in turn
#   reps     number of timed repetitions
#   by       stratum column (mode "batch")
#
# Prints one line "RESULT_JSON: {...}" on stdout. Times are system.time()[["elapsed"]]
# (times_s) and user.self + sys.self (cpu_s), with gcFirst = TRUE. BLAS: whatever R
# links (reference BLAS is single-threaded); glmmTMB runs with parallel = 1.
suppressPackageStartupMessages({
  library(jsonlite)
})
args <- commandArgs(trailingOnly = TRUE)
spec <- fromJSON(args[[1]], simplifyVector = TRUE)

engine <- spec$engine
if (engine == "glmer") {
  suppressPackageStartupMessages(library(lme4))
  engine_version <- as.character(packageVersion("lme4"))
} else if (engine == "glmmTMB") {
  suppressPackageStartupMessages(library(glmmTMB))
  engine_version <- as.character(packageVersion("glmmTMB"))
} else {
  stop("unknown engine ", engine)
}

d <- read.csv(spec$csv, stringsAsFactors = FALSE)
for (nm in names(spec$levels)) {
  d[[nm]] <- factor(as.character(d[[nm]]), levels = as.character(spec$levels[[nm]]))
}
fam <- switch(spec$family,
  binomial = binomial(), poisson = poisson(), gaussian = gaussian(),
  stop("unknown family ", spec$family)
)
f <- as.formula(spec$formula)

fit_one <- function(data) {
  if (engine == "glmer") {
    if (spec$family == "gaussian") lmer(f, data = data, REML = FALSE) else glmer(f, data = data, family = fam)
  } else {
    glmmTMB(f, data = data, family = fam, control = glmmTMBControl(parallel = 1))
  }
}

conv_info <- function(m) {
  if (engine == "glmer") {
    msgs <- c(m@optinfo$conv$lme4$messages, m@optinfo$warnings)
    list(
      converged = (m@optinfo$conv$opt == 0) &&
        !any(grepl("failed to converge", unlist(msgs))),
      singular = isSingular(m),
      messages = as.character(unlist(msgs))
    )
  } else {
    list(
      converged = (m$fit$convergence == 0) && isTRUE(m$sdr$pdHess),
      singular = NA,
      messages = as.character(m$fit$message)
    )
  }
}

summarise_fit <- function(m) {
  ll <- as.numeric(logLik(m))
  if (engine == "glmer") {
    fe <- fixef(m)
    vc <- as.data.frame(VarCorr(m))
    theta <- as.numeric(getME(m, "theta"))
  } else {
    fe <- fixef(m)$cond
    vc <- NULL
    vcl <- VarCorr(m)$cond
    rows <- list()
    for (g in names(vcl)) {
      S <- vcl[[g]]
      sds <- sqrt(diag(S))
      nms <- colnames(S)
      for (i in seq_along(nms)) rows[[length(rows) + 1]] <- data.frame(grp = g, var1 = nms[i], var2 = NA, sdcor = sds[i])
      if (length(nms) > 1) {
        C <- cov2cor(S)
        for (i in 1:(length(nms) - 1)) for (j in (i + 1):length(nms)) {
          rows[[length(rows) + 1]] <- data.frame(grp = g, var1 = nms[i], var2 = nms[j], sdcor = C[i, j])
        }
      }
    }
    vc <- do.call(rbind, rows)
    theta <- NULL
  }
  re <- list()
  for (i in seq_len(nrow(vc))) {
    if (vc$grp[i] == "Residual") next
    key <- if (is.na(vc$var2[i])) paste0("sd(", vc$grp[i], ":", vc$var1[i], ")") else
      paste0("cor(", vc$grp[i], ":", vc$var1[i], ",", vc$var2[i], ")")
    re[[key]] <- vc$sdcor[i]
  }
  c(list(loglik = ll, fixed = as.list(fe), re = re, theta = theta, nobs = nobs(m)), conv_info(m))
}

reps <- as.integer(spec$reps)
out <- list(engine = engine, engine_version = engine_version,
            R_version = R.version.string, mode = spec$mode, reps = reps)

if (spec$mode == "single") {
  m <- fit_one(d) # warm-up, untimed
  times <- numeric(reps)
  cpu <- numeric(reps)
  for (i in seq_len(reps)) {
    st <- system.time(m <- fit_one(d), gcFirst = TRUE)
    times[i] <- st[["elapsed"]]
    cpu[i] <- st[["user.self"]] + st[["sys.self"]]
  }
  out$times_s <- times
  out$cpu_s <- cpu
  out$fit <- summarise_fit(m)
} else if (spec$mode == "batch") {
  parts <- split(d, d[[spec$by]], drop = TRUE)
  invisible(fit_one(parts[[1]])) # warm-up, untimed
  times <- numeric(reps)
  cpu <- numeric(reps)
  for (i in seq_len(reps)) {
    st <- system.time({
      fits <- lapply(parts, function(p) tryCatch(fit_one(p), error = function(e) e))
    }, gcFirst = TRUE)
    times[i] <- st[["elapsed"]]
    cpu[i] <- st[["user.self"]] + st[["sys.self"]]
  }
  out$cpu_s <- cpu
  ok <- !vapply(fits, function(x) inherits(x, "error"), logical(1))
  lls <- vapply(fits, function(x) if (inherits(x, "error")) NA_real_ else as.numeric(logLik(x)), numeric(1))
  conv <- vapply(fits, function(x) if (inherits(x, "error")) FALSE else isTRUE(conv_info(x)$converged), logical(1))
  out$times_s <- times
  out$n_strata <- length(parts)
  out$n_failed <- sum(!ok)
  out$n_converged <- sum(conv)
  out$loglik_by_stratum <- as.list(setNames(lls, names(parts)))
} else {
  stop("unknown mode ", spec$mode)
}
cat("RESULT_JSON: ", toJSON(out, auto_unbox = TRUE, digits = NA, na = "null", null = "null"), "\n", sep = "")
