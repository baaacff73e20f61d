-- Argo CD health check for promptflow.dev/PromptFlowRuntime (argocd-cm key:
-- resource.customizations.health.promptflow.dev_PromptFlowRuntime).
-- The operator sets the kstatus conditions Stalled and Reconciling only while they are True.
local hs = {}
local st = obj.status

-- A status that predates the current spec says nothing about it.
local generation = obj.metadata.generation or 0
if st == nil or (st.observedGeneration or 0) < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. string.format("%d", generation)
  return hs
end

local function condition(type)
  for _, c in ipairs(st.conditions or {}) do
    if c.type == type and c.status == "True" then
      return c
    end
  end
  return nil
end

local stalled = condition("Stalled")
if stalled ~= nil then
  hs.status = "Degraded"
  hs.message = stalled.message
  return hs
end
local reconciling = condition("Reconciling")
if reconciling ~= nil then
  hs.status = "Progressing"
  hs.message = reconciling.message
  return hs
end

-- Reasons for which "Not available" is a deliberate stop rather than a problem.
local stopped = { StoppedIdle = true, StoppedByUser = true, ComputeInstanceStopped = true }

hs.message = st.message
if st.phase == "Running" and condition("Ready") ~= nil then
  hs.status = "Healthy"
elseif st.phase == "Not available" and stopped[st.reason or ""] then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
end
return hs
